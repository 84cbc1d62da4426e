"""One rollout batch: sample responses chunk by chunk while the previous chunks' Score and
ReferenceLogProbs RPCs run, then the policy's own log-probs and values while the last ones finish."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from policy_trainer.config import RolloutConfig
from policy_trainer.data import Prompt
from policy_trainer.models import ActorCritic
from policy_trainer.remote import RemoteRewards, RewardInput
from policy_trainer.sampling import (
    SamplingMask,
    left_pad,
    right_pad,
    sample_responses,
    truncate_after_eos,
)


@dataclass
class RolloutBatch:
    """N sequences (k samples of each prompt contiguous); prompt left-padded, response right-padded."""

    query: torch.Tensor
    """[N, P] prompt ids, left-padded."""
    query_mask: torch.Tensor
    """[N, P]."""
    response: torch.Tensor
    """[N, R] response ids up to and including the first EOS, pad after."""
    response_mask: torch.Tensor
    """[N, R] 1 on response tokens."""
    old_logprobs: torch.Tensor
    """[N, R] policy log-probs at sampling time (0 on padding)."""
    ref_logprobs: torch.Tensor
    """[N, R] reference log-probs from the server (0 on padding and where missing)."""
    old_values: torch.Tensor | None
    """[N, R] values at sampling time, or None without a value function."""
    scores: torch.Tensor
    """[N] scores from the server, NaN where the server returned none."""
    has_eos: torch.Tensor
    """[N] bool."""
    valid: torch.Tensor
    """[N] bool: both a score and reference log-probs came back."""
    completions: list[str]
    """Decoded responses (for logs)."""
    sampling_mask: SamplingMask | None = None
    """The tokens the sampler never drew; every log-prob of these responses (rollout and update)
    is taken with them masked out, under the distribution they were drawn from."""

    def __len__(self) -> int:
        return self.query.shape[0]


def trimmed_forward(
    model: torch.nn.Module,
    query: torch.Tensor,
    query_mask: torch.Tensor,
    response: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float,
    with_values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Forward of prompt + response with all-pad prompt columns on the left and all-pad response
    columns on the right dropped. Returns (logits [B, R', V], values [B, R'] | None, R')."""
    left = int((query_mask.sum(dim=0) == 0).long().cumprod(dim=0).sum())  # leading pad columns
    r_len = int(response_mask.sum(dim=1).max())
    q, qm = query[:, left:], query_mask[:, left:]  # [B, P']
    ids = torch.cat([q, response[:, :r_len]], dim=1)  # [B, P' + R']
    mask = torch.cat([qm, response_mask[:, :r_len]], dim=1)  # [B, P' + R']
    logits, values = model(ids, mask, q.shape[1], temperature, with_values)
    return logits, values, r_len


@torch.no_grad()
def policy_logprobs(
    model: ActorCritic,
    query: torch.Tensor,
    query_mask: torch.Tensor,
    response: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float,
    sampling_mask: SamplingMask | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [B, R] and values [B, R] | None of the responses, 0 on padding; with
    ``sampling_mask``, under the distribution the sampler drew from (`SamplingMask`)."""
    from policy_trainer.losses import logprobs_from_logits

    logits, values, r_len = trimmed_forward(
        model, query, query_mask, response, response_mask, temperature
    )
    if sampling_mask is not None:
        logits = sampling_mask.apply(logits)
    maskf = response_mask.float()
    logp = torch.zeros(response.shape, dtype=torch.float32, device=response.device)
    logp[:, :r_len] = logprobs_from_logits(logits, response[:, :r_len])
    logp = logp * maskf
    if values is not None:
        full = torch.zeros_like(logp)
        full[:, :r_len] = values.float()
        values = full * maskf
    return logp, values


def _reward_input(prompt: Prompt, completion: str) -> RewardInput:
    if prompt.messages is not None:
        return [*prompt.messages, {"role": "assistant", "content": completion}]
    return (prompt.text, completion)


def _reward_ids(prompt: Prompt, response: list[int], eos: int) -> list[int] | None:
    """What the reward model reads, as the policy's token ids: prompt + response without its
    final EOS (the text path's ``prompt + completion``, which has no EOS either:
    `reward_server.models.text_format`), with no decode/re-encode. None for a chat prompt: its
    ids carry the policy's generation prompt, not the reward model's rendering of the
    conversation, so it goes as text."""
    if prompt.messages is not None:
        return None
    if response and response[-1] == eos:
        response = response[:-1]
    return prompt.token_ids + response


def collect_rollout(
    model: ActorCritic,
    prompts: list[Prompt],
    cfg: RolloutConfig,
    remote: RemoteRewards,
    tokenizer: Any,
    device: torch.device,
    generator: torch.Generator | None,
) -> tuple[RolloutBatch, dict[str, float]]:
    """Sample ``cfg.samples_per_prompt`` responses per prompt in chunks of ``cfg.chunk_size``.

    Chunk i's RPCs are submitted as soon as it is sampled and run while chunk i+1 is sampled
    (NeMo-Aligner's futures pattern). With ``cfg.overlap == "batch"`` the policy log-probs and
    values of all chunks are computed after the last chunk is sampled, so the last chunks' RPCs
    overlap the whole policy forward instead of one chunk's; "chunk" computes each chunk's right
    after it is sampled; "none" blocks on each chunk's RPCs at once (the sequential baseline).
    Results are collected at the end. Returns the batch and stats (generation_seconds,
    policy_forward_seconds, rpc_wait_seconds, and prompt_tokens_saved_share: the share of the
    prompt tokens a prefix-sharing server computes once for several samples,
    `shared_prompt_tokens`). The samples of a prompt are adjacent, so a chunk_size that is a
    multiple of samples_per_prompt sends all of them in one request.
    """
    seqs = [p for p in prompts for _ in range(cfg.samples_per_prompt)]
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    r_max = cfg.max_new_tokens
    suppress = (
        sorted({int(i) for i in tokenizer.all_special_ids} - {int(eos)})
        if cfg.suppress_special_tokens
        else None
    )
    drawn = (
        SamplingMask(int(eos), tuple(suppress or ()), cfg.min_new_tokens)
        if cfg.logprobs_as_sampled
        else None
    )
    parts: list[dict[str, Any]] = []
    gen_seconds = fwd_seconds = 0.0

    def policy_forward(part: dict[str, Any]) -> None:
        nonlocal fwd_seconds
        t = time.perf_counter()
        part["logp"], part["values"] = policy_logprobs(
            model, part["q"], part["qm"], part["resp"], part["rmask"], cfg.temperature, drawn
        )
        fwd_seconds += time.perf_counter() - t

    remote.pop_wait_seconds()
    shared_tokens = 0
    for start in range(0, len(seqs), cfg.chunk_size):
        chunk = seqs[start : start + cfg.chunk_size]
        t0 = time.perf_counter()
        q, qm = left_pad([p.token_ids for p in chunk], pad, device)  # [C, P]
        raw = sample_responses(
            model.policy,
            q,
            qm,
            r_max,
            cfg.temperature,
            eos,
            pad,
            generator,
            cfg.min_new_tokens,
            suppress,
        )
        resp, rmask, has_eos = truncate_after_eos(raw, eos, pad)  # [C, R']
        lengths = rmask.sum(dim=1).tolist()
        resp_lists = [resp[i, : lengths[i]].tolist() for i in range(len(chunk))]
        completions = tokenizer.batch_decode(resp_lists, skip_special_tokens=True)
        shared_tokens += shared_prompt_tokens([p.token_ids for p in chunk])
        rpcs = remote.submit(
            [_reward_input(p, c) for p, c in zip(chunk, completions, strict=True)],
            [p.token_ids + r for p, r in zip(chunk, resp_lists, strict=True)],
            [len(p.token_ids) for p in chunk],
            [_reward_ids(p, r, eos) for p, r in zip(chunk, resp_lists, strict=True)],
        )
        resp, rmask = right_pad(resp_lists, pad, device, width=r_max)  # [C, R]
        gen_seconds += time.perf_counter() - t0
        part = dict(
            query=[p.token_ids for p in chunk],
            q=q,
            qm=qm,
            resp=resp,
            rmask=rmask,
            has_eos=has_eos,
            completions=completions,
            rpcs=rpcs,
            lengths=lengths,
        )
        if cfg.overlap == "none":
            part["results"] = remote.collect(rpcs)
        if cfg.overlap != "batch":
            policy_forward(part)
        parts.append(part)
    if cfg.overlap == "batch":
        for part in parts:
            policy_forward(part)
    scores, refs, valid = [], [], []
    for part in parts:
        s, r = part["results"] if "results" in part else remote.collect(part["rpcs"])
        ref = torch.zeros_like(part["logp"])  # [C, R]
        for i, lp in enumerate(r):
            if lp is not None:
                ref[i, : len(lp)] = torch.from_numpy(np.asarray(lp, dtype=np.float32))
        scores.append(torch.from_numpy(s).to(device))
        refs.append(ref * part["rmask"])
        valid.append(
            torch.tensor([lp is not None for lp in r], device=device) & torch.isfinite(scores[-1])
        )
    query, query_mask = left_pad([ids for p in parts for ids in p["query"]], pad, device)
    cat = torch.cat
    batch = RolloutBatch(
        query=query,
        query_mask=query_mask,
        response=cat([p["resp"] for p in parts]),
        response_mask=cat([p["rmask"] for p in parts]),
        old_logprobs=cat([p["logp"] for p in parts]),
        ref_logprobs=cat(refs),
        old_values=cat([p["values"] for p in parts]) if model.has_values else None,
        scores=cat(scores),
        has_eos=cat([p["has_eos"] for p in parts]),
        valid=cat(valid),
        completions=[c for p in parts for c in p["completions"]],
        sampling_mask=drawn,
    )
    return batch, {
        "generation_seconds": gen_seconds,
        "policy_forward_seconds": fwd_seconds,
        "rpc_wait_seconds": remote.pop_wait_seconds(),
        "prompt_tokens_saved_share": shared_tokens / max(1, sum(len(p.token_ids) for p in seqs)),
    }


def shared_prompt_tokens(prompts: list[list[int]]) -> int:
    """Prompt tokens a prefix-sharing server need not recompute for one RPC's sequences: each
    distinct prompt sent n times counts ``(n - 1) x len(prompt)`` (docs/API.md, "Batching": the
    samples of one prompt in one request share its forward)."""
    counts: dict[tuple[int, ...], int] = {}
    for ids in prompts:
        counts[tuple(ids)] = counts.get(tuple(ids), 0) + 1
    return sum((n - 1) * len(ids) for ids, n in counts.items())
