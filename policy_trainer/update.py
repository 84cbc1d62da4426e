"""The PPO update: epochs over reshuffled minibatches, gradient accumulation, clipping, Adam."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from policy_trainer.config import PPOConfig
from policy_trainer.experience import Experience
from policy_trainer.losses import entropy_from_logits, logprobs_from_logits, policy_loss, value_loss
from policy_trainer.masked_stats import masked_mean
from policy_trainer.rollout import RolloutBatch, trimmed_forward


@dataclass
class MinibatchLosses:
    """Losses and diagnostics of one forward over a set of rows."""

    loss: torch.Tensor
    policy_loss: torch.Tensor
    value_loss: torch.Tensor
    clipfrac: torch.Tensor
    vf_clipfrac: torch.Tensor
    approx_kl: torch.Tensor
    entropy: torch.Tensor
    ratio_mean: torch.Tensor
    ratio_max_abs_dev: torch.Tensor


def minibatch_losses(
    model: nn.Module,
    batch: RolloutBatch,
    exp: Experience,
    idx: torch.Tensor,
    cfg: PPOConfig,
    temperature: float,
    with_values: bool,
) -> MinibatchLosses:
    """Forward the rows ``idx`` and compute the clipped policy and value losses."""
    mask_full = exp.mask[idx]  # [b, R]
    logits, values, r = trimmed_forward(
        model,
        batch.query[idx],
        batch.query_mask[idx],
        batch.response[idx],
        batch.response_mask[idx],
        temperature,
        with_values,
    )
    if batch.sampling_mask is not None:  # as at sampling time (`SamplingMask`)
        logits = batch.sampling_mask.apply(logits)
    mask = mask_full[:, :r]  # [b, r]
    logp = logprobs_from_logits(logits, batch.response[idx][:, :r])  # [b, r]
    old_logp = batch.old_logprobs[idx][:, :r]  # [b, r]
    pg = policy_loss(logp, old_logp, exp.advantages[idx][:, :r], mask, cfg.cliprange)
    zero = torch.zeros((), device=logp.device)
    vf, vf_clip = zero, zero
    if with_values and values is not None and exp.returns is not None:
        vf, vf_clip = value_loss(
            values, batch.old_values[idx][:, :r], exp.returns[idx][:, :r], mask, cfg.cliprange_value
        )
    with torch.no_grad():
        entropy = masked_mean(entropy_from_logits(logits.detach()), mask)
        dev = ((logp - old_logp).exp() - 1).abs() * mask
        ratio_dev = dev.max() if dev.numel() else zero
    return MinibatchLosses(
        loss=pg.loss + cfg.vf_coef * vf,
        policy_loss=pg.loss.detach(),
        value_loss=vf.detach(),
        clipfrac=pg.clipfrac,
        vf_clipfrac=vf_clip,
        approx_kl=pg.approx_kl,
        entropy=entropy,
        ratio_mean=pg.ratio_mean,
        ratio_max_abs_dev=ratio_dev,
    )


def ppo_update(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batch: RolloutBatch,
    exp: Experience,
    cfg: PPOConfig,
    temperature: float,
    generator: torch.Generator,
    with_values: bool,
) -> dict[str, float]:
    """``cfg.epochs`` passes over reshuffled minibatches; one optimizer step per minibatch with
    gradient accumulation over micro-batches (cleanrl ``ppo.py``; Huang et al. 2024, "The N+
    Implementation Details of RLHF with PPO", https://arxiv.org/abs/2403.17031). ``model``
    may be DDP-wrapped: micro-steps before the last skip the gradient all-reduce."""
    n = len(batch)
    micro = cfg.micro_batch_size or cfg.minibatch_size
    accum = cfg.minibatch_size // micro
    params = [p for g in optimizer.param_groups for p in g["params"]]
    sums: dict[str, float] = defaultdict(float)
    count = 0
    steps = 0
    grad_norm = 0.0
    first: MinibatchLosses | None = None
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=generator).to(batch.query.device)
        for mb_start in range(0, n, cfg.minibatch_size):
            mb = perm[mb_start : mb_start + cfg.minibatch_size]
            for k in range(accum):
                idx = mb[k * micro : (k + 1) * micro]
                sync = k == accum - 1 or not hasattr(model, "no_sync")
                with contextlib.nullcontext() if sync else model.no_sync():
                    out = minibatch_losses(model, batch, exp, idx, cfg, temperature, with_values)
                    (out.loss / accum).backward()
                if first is None:
                    first = out
                for name in (
                    "policy_loss",
                    "value_loss",
                    "clipfrac",
                    "vf_clipfrac",
                    "approx_kl",
                    "entropy",
                    "ratio_mean",
                ):
                    sums[name] += float(getattr(out, name))
                count += 1
            if cfg.max_grad_norm > 0:
                grad_norm += float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
            steps += 1
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    stats = {k: v / max(count, 1) for k, v in sums.items()}
    if cfg.max_grad_norm > 0:
        stats["grad_norm"] = grad_norm / max(steps, 1)
    if first is not None:
        stats["first_ratio_max_abs_dev"] = float(first.ratio_max_abs_dev)
        stats["first_clipfrac"] = float(first.clipfrac)
    stats["lr"] = scheduler.get_last_lr()[0]
    return stats


def build_optimizer(
    model: nn.Module, cfg: PPOConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW (eps 1e-5 by default, as in Huang et al. 2024, https://arxiv.org/abs/2403.17031)
    over the trainable parameters, with linear
    decay to 0 over ``total_steps`` optimizer steps (or a constant LR)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=cfg.lr, eps=cfg.adam_eps, weight_decay=cfg.weight_decay
    )
    if cfg.lr_schedule == "linear":
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: max(0.0, 1.0 - step / max(total_steps, 1))
        )
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return optimizer, scheduler
