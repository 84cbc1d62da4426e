"""Padding, response sampling and EOS truncation.

Sampling is a plain loop over the model's forward with a KV cache rather than ``generate``: the
distribution is exactly ``softmax(logits / T)`` in float32 (no top-k/top-p or repetition
processors merged in from a checkpoint's generation_config), the position ids are the same
``cumsum(mask) - mask`` as in every log-prob forward, and the RNG is an explicit generator whose
state the checkpoints save.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from policy_trainer.models import position_ids_from_mask


def pad_tokens(
    seqs: list[list[int]],
    pad_id: int,
    side: str,
    device: torch.device | str = "cpu",
    width: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token lists on the `side` ("left" or "right") -> (ids [B, W], mask [B, W]);
    W = the longest (or ``width``)."""
    w = max(len(s) for s in seqs) if width is None else width
    ids = torch.full((len(seqs), w), pad_id, dtype=torch.long)  # [B, W]
    mask = torch.zeros((len(seqs), w), dtype=torch.long)  # [B, W]
    for i, s in enumerate(seqs):
        if s:
            cols = slice(w - len(s), w) if side == "left" else slice(0, len(s))
            ids[i, cols] = torch.tensor(s, dtype=torch.long)
            mask[i, cols] = 1
    return ids.to(device), mask.to(device)


def left_pad(
    seqs: list[list[int]], pad_id: int, device: torch.device | str = "cpu", width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists (prompts for generation) -> (ids [B, W], mask [B, W])."""
    return pad_tokens(seqs, pad_id, "left", device, width)


def right_pad(
    seqs: list[list[int]], pad_id: int, device: torch.device | str = "cpu", width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists (responses) -> (ids [B, W], mask [B, W])."""
    return pad_tokens(seqs, pad_id, "right", device, width)


def truncate_after_eos(
    responses: torch.Tensor, eos_id: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep each response up to and including its first EOS (as in Huang et al. 2024, "The N+
    Implementation Details of RLHF with PPO", https://arxiv.org/abs/2403.17031).

    responses [B, R] -> (responses with pad after the EOS [B, R], mask [B, R] (1 up to and
    including the EOS, or everywhere when there is none), has_eos [B] bool).
    """
    is_eos = responses == eos_id  # [B, R]
    has_eos = is_eos.any(dim=1)  # [B]
    first = torch.where(has_eos, is_eos.long().argmax(dim=1), responses.shape[1] - 1)  # [B]
    idx = torch.arange(responses.shape[1], device=responses.device).unsqueeze(0)  # [1, R]
    mask = (idx <= first.unsqueeze(1)).long()  # [B, R]
    return torch.where(mask.bool(), responses, torch.full_like(responses, pad_id)), mask, has_eos


@dataclass(frozen=True)
class SamplingMask:
    """The tokens `sample_responses` never draws: ``suppress_ids`` everywhere, EOS at the first
    ``min_new_tokens`` response positions.

    Every log-prob of a sampled response (rollout, update, evaluation) must be taken under the
    distribution it was drawn from, ``softmax`` over the allowed tokens only; under the full
    softmax, probability the policy puts on a never-drawn token lowers the log-prob of every
    drawn one, so the k1 KL estimate ``log pi - log pi_ref`` (and the PPO ratio) is off by
    ``log(1 - pi(never-drawn))`` per token. A policy learns that: with EOS suppressed at the first
    position, the demo's PPO policy put 0.9-0.98 of its first-token mass on EOS, and the measured
    KL of its responses fell to near 0 while their reward rose (2026-11-27). The KL estimators are
    defined for samples of the policy itself (Schulman, "Approximating KL Divergence",
    http://joschu.net/blog/kl-approx.html).
    """

    eos_id: int
    suppress_ids: tuple[int, ...] = ()
    min_new_tokens: int = 0

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` [B, R, V] of response positions 0..R-1 -> the same with the never-drawn
        tokens at the float32 minimum (finite, so entropies stay finite; probability 0)."""
        blocked = torch.zeros(logits.shape[1:], dtype=torch.bool, device=logits.device)  # [R, V]
        if self.suppress_ids:
            blocked[:, list(self.suppress_ids)] = True
        blocked[: self.min_new_tokens, self.eos_id] = True
        return logits.masked_fill(blocked, torch.finfo(logits.dtype).min)


@torch.no_grad()
def sample_responses(
    model: nn.Module,
    query: torch.Tensor,
    query_mask: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    eos_id: int,
    pad_id: int,
    generator: torch.Generator | None = None,
    min_new_tokens: int = 0,
    suppress_ids: list[int] | None = None,
) -> torch.Tensor:
    """Sample up to ``max_new_tokens`` tokens per row from ``softmax(logits / T)``; EOS is
    suppressed for the first ``min_new_tokens`` tokens (HF generate's ``min_new_tokens``) and the
    ``suppress_ids`` are never sampled.

    query, query_mask: [B, P] left-padded. Returns [B, R] (R <= max_new_tokens; sampling stops
    early once every row has produced an EOS, tokens after a row's EOS are ``pad_id``).
    """
    mask = query_mask.long()
    pos = position_ids_from_mask(mask)  # [B, P]
    out = model(input_ids=query, attention_mask=mask, position_ids=pos, use_cache=True)
    next_pos = pos[:, -1:] + 1  # [B, 1]
    finished = torch.zeros(query.shape[0], dtype=torch.bool, device=query.device)  # [B]
    tokens = []
    for step in range(max_new_tokens):
        logits = out.logits[:, -1, :].float() / temperature  # [B, V]
        if suppress_ids:
            logits[:, suppress_ids] = float("-inf")
        if step < min_new_tokens:
            logits[:, eos_id] = float("-inf")
        probs = torch.softmax(logits, dim=-1)  # [B, V]
        nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # [B]
        nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
        tokens.append(nxt)
        finished |= nxt == eos_id
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # [B, P + step + 1]
        out = model(
            input_ids=nxt.unsqueeze(1),
            attention_mask=mask,
            position_ids=next_pos,
            past_key_values=out.past_key_values,
            use_cache=True,
        )
        next_pos = next_pos + 1
    return torch.stack(tokens, dim=1)  # [B, R]
