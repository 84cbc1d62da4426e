"""Best-of-n rejection sampling over the service (``policy-trainer best-of-n``).

For every prompt: sample n completions from the policy (in chunks of ``sampling.chunk_size``
sequences), score all n in one Score request (so a server can share the prompt's computation),
keep the best. Llama 2 trains on such samples (Touvron et al. 2023, section 3.2.3, "Rejection
Sampling"); ``--sft`` fine-tunes the policy on them. The output, ``best_of_n.jsonl``, has one line
per prompt (its index, the prompt, the best completion, its score, all n scores), appended as each
prompt finishes, so a stopped run continues at the first prompt index it has not written.

Best-of-n's KL from the sampling policy is ``ln n - (n - 1) / n`` nats (Stiennon et al. 2020,
"Learning to summarize from human feedback", appendix G.3; Gao et al. 2022, "Scaling Laws for
Reward Model Overoptimization", section 2): ``summary.json`` reports it next to the measured scores.
"""

from __future__ import annotations

import json
import logging
import math
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm import tqdm

from policy_trainer.best_of_n_config import BestOfNConfig, BestOfNSampling, analytic_kl
from policy_trainer.config import ConfigError

__all__ = ["BestOfNConfig", "analytic_kl", "read_done", "run_best_of_n", "sft_on_samples"]

log = logging.getLogger(__name__)

OUTPUT_NAME = "best_of_n.jsonl"


def read_done(path: Path) -> list[dict[str, Any]]:
    """The complete lines of an output file (a torn last line, from a crash, is dropped)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            break
    return rows


def summarize(rows: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """Mean best score, mean score of all samples and the analytic KL of best-of-n."""
    best = [r["score"] for r in rows if r["score"] is not None]
    every = [s for r in rows for s in r["scores"] if s is not None]
    return {
        "n": n,
        "prompts": len(rows),
        "best_score_mean": float(np.mean(best)) if best else float("nan"),
        "score_mean": float(np.mean(every)) if every else float("nan"),
        "analytic_kl": analytic_kl(n),
    }


def _sample(
    policy: torch.nn.Module,
    tokenizer: Any,
    prompt_ids: list[int],
    cfg: BestOfNSampling,
    device: torch.device,
    gen: torch.Generator,
) -> tuple[list[list[int]], list[str]]:
    """n completions (token ids up to and including EOS, and their text) of one prompt."""
    from policy_trainer.sampling import left_pad, sample_responses, truncate_after_eos

    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    suppress = (
        sorted({int(i) for i in tokenizer.all_special_ids} - {int(eos)})
        if cfg.suppress_special_tokens
        else None
    )
    ids: list[list[int]] = []
    for a in range(0, cfg.n, cfg.chunk_size):
        c = min(cfg.chunk_size, cfg.n - a)
        q, qm = left_pad([prompt_ids] * c, pad, device)  # [c, P]
        raw = sample_responses(
            policy, q, qm, cfg.max_new_tokens, cfg.temperature, eos, pad, gen,
            cfg.min_new_tokens, suppress,
        )  # fmt: skip
        resp, rmask, _ = truncate_after_eos(raw, eos, pad)  # [c, R]
        lengths = rmask.sum(dim=1).tolist()
        ids += [resp[i, : lengths[i]].tolist() for i in range(c)]
    return ids, tokenizer.batch_decode(ids, skip_special_tokens=True)


def run_best_of_n(cfg: BestOfNConfig) -> dict[str, Any]:
    """Sample, score and keep the best for every prompt not yet in the output; returns the
    summary (also written to summary.json)."""
    from policy_trainer.data import load_prompts
    from policy_trainer.models import load_policy, load_tokenizer, resolve_device
    from policy_trainer.remote import (
        RemoteRewards,
        check_reward_model,
        open_client,
        pin_model_versions,
    )
    from policy_trainer.rollout import _reward_input
    from reward_server.seeding import seed_everything

    if cfg.run.num_threads is not None:
        torch.set_num_threads(cfg.run.num_threads)
    seed_everything(cfg.run.seed)
    run_dir = Path(cfg.run.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    out_path = run_dir / OUTPUT_NAME
    done = read_done(out_path)
    if done and any(r.get("n") != cfg.sampling.n for r in done):
        raise ConfigError(f"{out_path} holds samples of another n; choose another run.output_dir")
    # rewrite without a torn last line, so appends continue a well-formed file
    out_path.write_text("".join(json.dumps(r) + "\n" for r in done))
    device = resolve_device(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    prompts = load_prompts(cfg.data, tokenizer)[: cfg.run.max_prompts]
    todo = list(range(len(done), len(prompts)))
    if todo:
        policy = load_policy(cfg.model, device).eval()
        client, info = open_client(cfg.server)
        check_reward_model(info, cfg.server)
        remote = RemoteRewards(client, cfg.server, cfg.sampling.temperature, None, workers=2)
        # pinned for the whole output file: a resumed file keeps its recorded version
        pins = pin_model_versions(
            info,
            cfg.server,
            out_path.with_name(out_path.name + ".model_versions.json"),
            resume=bool(done),
            write=True,
            roles=("reward",),
        )
        remote.score_version = pins.get("reward", "")
        bar = tqdm(
            total=len(prompts), initial=len(done), desc=f"best-of-{cfg.sampling.n}",
            disable=not cfg.run.progress, dynamic_ncols=True,
        )  # fmt: skip
        pending: tuple[int, list[list[int]], list[str], Future] | None = None
        try:
            with out_path.open("a") as f:
                for i in [*todo, None]:
                    nxt = None
                    if i is not None:
                        # prompt i's RPC runs while prompt i+1 is sampled
                        gen = torch.Generator(device).manual_seed(
                            int(np.random.SeedSequence([cfg.run.seed, i]).generate_state(1)[0])
                        )
                        ids, texts = _sample(
                            policy, tokenizer, prompts[i].token_ids, cfg.sampling, device, gen
                        )
                        items = [_reward_input(prompts[i], t) for t in texts]
                        nxt = (i, ids, texts, remote.submit_scores(items))
                    if pending is not None:
                        row = _best_row(pending, prompts, cfg.sampling.n, remote)
                        f.write(json.dumps(row) + "\n")
                        f.flush()
                        done.append(row)
                        bar.update(1)
                        bar.set_postfix(
                            best=f"{summarize(done, cfg.sampling.n)['best_score_mean']:.3f}"
                        )
                    pending = nxt
        finally:
            bar.close()
            remote.close()
            client.close()
    summary = {**summarize(done, cfg.sampling.n), "output": str(out_path)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _best_row(
    pending: tuple[int, list[list[int]], list[str], Future],
    prompts: list[Any],
    n: int,
    remote: Any,
) -> dict[str, Any]:
    i, ids, texts, fut = pending
    scores = remote.collect_scores(fut)  # [n] float32, NaN where the server returned none
    finite = np.isfinite(scores)
    best = int(np.argmax(np.where(finite, scores, -np.inf))) if finite.any() else None
    return {
        "index": i,
        "prompt": prompts[i].text,
        "messages": prompts[i].messages,
        "n": n,
        "completion": texts[best] if best is not None else None,
        "completion_token_ids": ids[best] if best is not None else None,
        "score": float(scores[best]) if best is not None else None,
        "scores": [float(s) if np.isfinite(s) else None for s in scores],
    }


def sft_on_samples(cfg: BestOfNConfig) -> Path:
    """Fine-tune the policy on the kept samples (negative log-likelihood of the best completion's
    tokens given its prompt), save it (Hugging Face format) and return its directory."""
    from policy_trainer.data import load_prompts
    from policy_trainer.losses import logprobs_from_logits
    from policy_trainer.models import ActorCritic, load_policy, load_tokenizer, resolve_device
    from policy_trainer.rollout import trimmed_forward
    from policy_trainer.sampling import left_pad, right_pad

    run_dir = Path(cfg.run.output_dir)
    rows = [r for r in read_done(run_dir / OUTPUT_NAME) if r["completion_token_ids"]]
    if not rows:
        raise ConfigError(f"--sft: no kept samples in {run_dir / OUTPUT_NAME}")
    rows.sort(key=lambda r: -r["score"])
    rows = rows[: max(1, round(cfg.sft.top_fraction * len(rows)))]
    device = resolve_device(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    prompts = load_prompts(cfg.data, tokenizer)
    model = ActorCritic(load_policy(cfg.model, device), None)
    model.eval()  # dropout off
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.sft.lr)
    rng = np.random.default_rng(cfg.run.seed)
    pad = tokenizer.pad_token_id
    steps = cfg.sft.epochs * math.ceil(len(rows) / cfg.sft.batch_size)
    bar = tqdm(total=steps, desc="sft", disable=not cfg.run.progress, dynamic_ncols=True)
    for _ in range(cfg.sft.epochs):
        order = rng.permutation(len(rows))
        for a in range(0, len(rows), cfg.sft.batch_size):
            part = [rows[j] for j in order[a : a + cfg.sft.batch_size]]
            q, qm = left_pad([prompts[r["index"]].token_ids for r in part], pad, device)
            resp, rmask = right_pad([r["completion_token_ids"] for r in part], pad, device)
            logits, _, w = trimmed_forward(model, q, qm, resp, rmask, 1.0, with_values=False)
            mask = rmask[:, :w].float()
            nll = -(logprobs_from_logits(logits, resp[:, :w]) * mask).sum() / mask.sum()
            opt.zero_grad(set_to_none=True)
            nll.backward()
            opt.step()
            bar.update(1)
            bar.set_postfix(nll=f"{float(nll.detach()):.3f}")
    bar.close()
    out = Path(cfg.sft.output_dir or run_dir / "sft")
    out.mkdir(parents=True, exist_ok=True)
    model.policy.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
