"""PPO losses and log-prob helpers (pure functions, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from policy_trainer.masked_stats import masked_mean


@dataclass
class PolicyLossOutput:
    """The clipped policy loss and its diagnostics (all 0-d tensors except ``per_token``)."""

    loss: torch.Tensor
    per_token: torch.Tensor
    clipfrac: torch.Tensor
    approx_kl: torch.Tensor
    ratio_mean: torch.Tensor


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log p(label)`` under ``softmax(logits)`` in float32; logits [B, T, V], labels [B, T]
    -> [B, T]. No top-k/top-p renormalisation; the caller has divided the logits by the sampling
    temperature, as every forward does (`ActorCritic.forward`;Huang et al., "The N Implementation Details of RLHF with PPO",
    https://iclr-blogposts.github.io/2024/blog/the-n-implementation-details-of-rlhf-with-ppo/)."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [B, T, V]
    return torch.gather(logp, 2, labels.unsqueeze(-1)).squeeze(-1)  # [B, T]


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` (logits already divided by the temperature): [B, T, V] ->
    [B, T] (float32)."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [B, T, V]
    return -(logp.exp() * logp).sum(dim=-1)  # [B, T]


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> PolicyLossOutput:
    """Clipped surrogate (Schulman et al. 2017, eq. 7), per token:
    ``max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps))``, masked mean (TRL ``ppo_trainer.py``).

    ``clipfrac`` is the fraction of tokens where the clipped term is the larger one;
    ``approx_kl = 0.5 * mean(dlogp^2)`` (TRL). All inputs [B, T].
    """
    log_ratio = logp - old_logp  # [B, T]
    ratio = torch.exp(log_ratio)  # [B, T]
    unclipped = -advantages * ratio  # [B, T]
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)  # [B, T]
    per_token = torch.max(unclipped, clipped)  # [B, T]
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = 0.5 * masked_mean(log_ratio.detach() ** 2, mask)
        ratio_mean = masked_mean(ratio.detach(), mask)
    return PolicyLossOutput(
        loss=masked_mean(per_token, mask),
        per_token=per_token,
        clipfrac=clipfrac,
        approx_kl=approx_kl,
        ratio_mean=ratio_mean,
    )


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss ``0.5 * max((v - R)^2, (clip(v, v_old - c, v_old + c) - R)^2)``, masked
    mean (TRL ``ppo_trainer.py``; Huang et al. 2024, https://arxiv.org/abs/2403.17031). Inputs [B, T];
    returns ``(loss, clipfrac)``."""
    v_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    loss_unclipped = (values - returns) ** 2  # [B, T]
    loss_clipped = (v_clipped - returns) ** 2  # [B, T]
    loss = 0.5 * masked_mean(torch.max(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((loss_clipped > loss_unclipped).float(), mask)
    return loss, clipfrac
