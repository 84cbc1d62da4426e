"""The reward-model training loop: data, model, optimisation, evaluation, export.

`train(cfg)` runs one whole job and writes to ``cfg.output``: the checkpoint (see
`reward_server.training.modeling`), ``metrics.jsonl`` (one line per evaluation), ``curves.png``,
``train_config.yaml`` and, when records were skipped, ``data_errors.txt``.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from reward_server.devices import DeviceError, resolve_device
from reward_server.dropout import disable_dropout
from reward_server.seeding import seed_everything
from reward_server.tokenizer_loading import TokenizerLoadError, load_tokenizer
from reward_server.training import modeling
from reward_server.training.batching import (
    Batch,
    TokenizedGroup,
    batch_indices,
    collate,
    tokenize_groups,
)
from reward_server.training.config import TrainConfig
from reward_server.training.data import (
    LoadReport,
    PreferenceGroup,
    load_completions,
    load_preferences,
    split_by_prompt,
)
from reward_server.training.losses import centering_loss, grouped_pair_loss, pair_accuracy
from reward_server.training.plots import plot_curves

MAX_ERRORS_SHOWN = 20


@dataclass
class TrainResult:
    """What a run produced."""

    output: Path
    """The checkpoint directory."""
    eval_accuracy: float
    """Final held-out pairwise accuracy."""
    eval_loss: float
    """Final held-out loss (mean over batch elements)."""
    steps: int
    """Optimizer steps taken."""
    normalization: dict[str, Any]
    """The statistics written to config.json as ``reward_normalization``."""
    evals: list[dict[str, Any]] = field(default_factory=list)
    """Every metrics.jsonl line."""
    skipped: int = 0
    """Malformed records skipped."""


def _report_skips(name: str, report: LoadReport, out: Path, log: Callable[[str], None]) -> None:
    if not report.skipped:
        return
    with (out / "data_errors.txt").open("a") as f:
        f.writelines(f"{m}\n" for m in report.skipped)
    for m in report.skipped[:MAX_ERRORS_SHOWN]:
        print(f"skipped malformed record: {m}", file=sys.stderr)
    more = len(report.skipped) - MAX_ERRORS_SHOWN
    if more > 0:
        print(f"... and {more} more (all in {out / 'data_errors.txt'})", file=sys.stderr)
    log(f"{name}: skipped {len(report.skipped)} malformed record(s), listed in data_errors.txt")


def rewards_and_loss(
    model: Any, b: Batch, device: str, bf16: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rewards of a collated batch [N] (float32) and its grouped pairwise loss."""
    with modeling.autocast(device, bf16):
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits  # [N, 1]
    rewards = logits[:, 0].float()  # [N]
    loss = grouped_pair_loss(
        rewards, b.chosen_idx, b.rejected_idx, b.group_idx, b.num_groups, b.margin
    )
    return rewards, loss


@torch.no_grad()
def evaluate(
    model: Any,
    groups: list[TokenizedGroup],
    *,
    batch_size: int,
    pad_token_id: int,
    device: str,
    bf16: bool,
    progress: bool = False,
) -> dict[str, float]:
    """Held-out loss (mean over batch elements, margins as in training) and pairwise accuracy."""
    model.eval()  # dropout off in evaluation
    loss_sum, n_groups, correct, n_pairs = 0.0, 0, 0.0, 0
    batches = batch_indices(len(groups), batch_size, shuffle=False, seed=0)
    for idx in tqdm(batches, desc="eval", leave=False, disable=not progress):
        b = collate([groups[i] for i in idx], pad_token_id).to(device)
        rewards, loss = rewards_and_loss(model, b, device, bf16)
        loss_sum += float(loss) * b.num_groups
        n_groups += b.num_groups
        correct += float(pair_accuracy(rewards[b.chosen_idx], rewards[b.rejected_idx]).sum())
        n_pairs += len(b.chosen_idx)
    model.train()
    return {"eval_loss": loss_sum / n_groups, "eval_accuracy": correct / n_pairs}


def _lr_lambda(total: int, warmup: int) -> Callable[[int], float]:
    """Linear warmup to the peak, then linear decay to 0 at the last step."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> TrainResult:
    """Run one training job described by ``cfg``; see the module docstring for the outputs."""
    t0 = time.monotonic()
    seed_everything(cfg.seed)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("metrics.jsonl", "data_errors.txt"):
        (out / stale).unlink(missing_ok=True)
    (out / "train_config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    try:
        device = resolve_device(cfg.device)
        # the model is resized to the tokenizer, so a pad token of its own may be added
        tokenizer = load_tokenizer(cfg.base_model, add_pad_token=True)
    except (DeviceError, TokenizerLoadError) as e:
        raise modeling.ModelSetupError(str(e)) from None
    bf16 = modeling.use_bf16(cfg.precision, device)

    # ---- data
    def preferences(files: list[str], what: str) -> tuple[list[PreferenceGroup], LoadReport]:
        groups, report = load_preferences(
            files,
            tokenizer,
            on_error=cfg.on_error,
            margin_from_data=cfg.margin_from_data,
            split=cfg.data_split,
        )
        _report_skips(what, report, out, log)
        return groups, report

    groups, report = preferences(cfg.data, "training data")
    skipped = len(report.skipped)
    if cfg.eval_data:
        train_groups = groups
        eval_groups, ev_report = preferences(cfg.eval_data, "eval data")
        skipped += len(ev_report.skipped)
    else:
        train_groups, eval_groups = split_by_prompt(groups, cfg.eval_fraction, cfg.seed)
    formats = ", ".join(f"{k} {v}" for k, v in sorted(report.formats.items()))
    log(
        f"data: {report.records} records ({formats}); train {len(train_groups)} elements / "
        f"{sum(len(g.pairs) for g in train_groups)} pairs, held out {len(eval_groups)} elements "
        f"/ {sum(len(g.pairs) for g in eval_groups)} pairs"
    )

    # ---- model
    model, new_params = modeling.load_backbone(
        cfg.base_model, tokenizer, seed=cfg.seed, quantization=cfg.quantization, device=device
    )
    log(
        f"model: {cfg.base_model} on {device}"
        + (" (bf16 autocast)" if bf16 else "")
        + (f"; new head initialised: {', '.join(new_params)}" if new_params else "; head kept")
    )
    max_length = cfg.max_length
    limit = modeling.max_positions(model)
    if limit is not None and max_length > limit:
        log(f"max_length {max_length} is over the model's {limit} positions; using {limit}")
        max_length = limit
    train_tok, n_trunc = tokenize_groups(train_groups, tokenizer, max_length, cfg.truncation_side)
    eval_tok, n_trunc_eval = tokenize_groups(
        eval_groups, tokenizer, max_length, cfg.truncation_side
    )
    if n_trunc or n_trunc_eval:
        log(
            f"truncated {n_trunc + n_trunc_eval} text(s) to {max_length} tokens "
            f"({cfg.truncation_side} side)"
        )
    if cfg.disable_dropout:
        disable_dropout(model)
    if cfg.quantization == "none":
        model.to(device)
    if cfg.lora_r:
        model = modeling.add_lora(model, cfg)
    model.train()
    params = list(modeling.trainable_parameters(model))
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    micro_per_epoch = math.ceil(len(train_tok) / cfg.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = int(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total_steps, warmup))
    log(
        f"training: {sum(p.numel() for p in params):,} trainable parameters, {cfg.epochs} "
        f"epoch(s) x {steps_per_epoch} steps (batch {cfg.batch_size} x accum {cfg.grad_accum})"
    )

    # ---- loop
    step = 0
    step_losses: list[tuple[int, float]] = []
    evals: list[dict[str, Any]] = []
    window_losses: list[float] = []
    pad_id = tokenizer.pad_token_id
    metrics_path = out / "metrics.jsonl"

    def run_eval(epoch: float) -> dict[str, Any]:
        ev = evaluate(
            model,
            eval_tok,
            batch_size=cfg.eval_batch_size,
            pad_token_id=pad_id,
            device=device,
            bf16=bf16,
            progress=cfg.progress,
        )
        train_loss = sum(window_losses) / len(window_losses) if window_losses else None
        window_losses.clear()
        line = {
            "epoch": epoch,
            "step": step,
            "train_loss": train_loss,
            "eval_loss": ev["eval_loss"],
            "eval_accuracy": ev["eval_accuracy"],
            "lr": scheduler.get_last_lr()[0],
            "elapsed_s": round(time.monotonic() - t0, 2),
        }
        evals.append(line)
        with metrics_path.open("a") as f:
            f.write(json.dumps(line) + "\n")
        log(
            f"eval epoch {epoch:g} step {step}: accuracy {ev['eval_accuracy']:.4f}, "
            f"loss {ev['eval_loss']:.4f}"
            + (f", train loss {train_loss:.4f}" if train_loss is not None else "")
        )
        return line

    for epoch in range(cfg.epochs):
        batches = batch_indices(len(train_tok), cfg.batch_size, shuffle=True, seed=cfg.seed + epoch)
        bar = tqdm(
            total=steps_per_epoch,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not cfg.progress,
            leave=False,
        )
        for start in range(0, len(batches), cfg.grad_accum):
            window = batches[start : start + cfg.grad_accum]
            step_loss = 0.0
            for idx in window:
                b = collate([train_tok[i] for i in idx], pad_id).to(device)
                rewards, loss = rewards_and_loss(model, b, device, bf16)
                total = loss + centering_loss(rewards, cfg.center_coef) if cfg.center_coef else loss
                (total / len(window)).backward()
                step_loss += float(loss.detach()) / len(window)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            step_losses.append((step, step_loss))
            window_losses.append(step_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}")
            if cfg.eval_every and step % cfg.eval_every == 0 and step % steps_per_epoch != 0:
                run_eval(round(epoch + (start + len(window)) / len(batches), 4))
        bar.close()
        final = run_eval(epoch + 1)

    # ---- export
    model.eval()
    model = modeling.merge_for_saving(model, cfg, tokenizer)
    if cfg.save_dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    if cfg.norm_data:
        ref_texts, norm_report = load_completions(
            cfg.norm_data, tokenizer, on_error=cfg.on_error, split=cfg.data_split
        )
        _report_skips("normalisation data", norm_report, out, log)
    else:
        ref_texts = sorted({t for g in train_groups for t in g.texts})
    if len(ref_texts) > cfg.norm_samples:
        ref_texts = random.Random(cfg.seed).sample(ref_texts, cfg.norm_samples)
    ref_rewards = modeling.score_texts(
        model,
        tokenizer,
        ref_texts,
        max_length=max_length,
        truncation_side=cfg.truncation_side,
        batch_size=cfg.eval_batch_size,
        device=device,
    )
    norm = modeling.normalization_stats(ref_rewards)
    modeling.save_checkpoint(model, tokenizer, str(out), norm)
    plot_curves(step_losses, evals, out / "curves.png")
    log(
        f"normalisation over {norm['count']} reference completions: mean {norm['mean']:.4f}, "
        f"std {norm['std']:.4f}"
    )
    log(
        f"held-out accuracy {final['eval_accuracy']:.4f}, held-out loss {final['eval_loss']:.4f} "
        f"after {step} steps ({time.monotonic() - t0:.1f}s); checkpoint in {out}"
    )
    return TrainResult(out, final["eval_accuracy"], final["eval_loss"], step, norm, evals, skipped)
