"""PPO losses and log-prob helpers (pure functions, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

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


@dataclass
class DPOLossOutput:
    """Per-pair DPO loss and the implicit rewards ``beta * (logp - ref_logp)`` (all [B])."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> DPOLossOutput:
    """Per-pair preference losses from sequence log-probs (sums over response tokens), all [B].

    With ``h = (logp_c - ref_c) - (logp_r - ref_r)``:

    - sigmoid: ``-log sigmoid(beta h)`` (Rafailov et al. 2023, eq. 7); with ``label_smoothing``
      eps > 0 the conservative DPO of Mitchell 2023 ("A note on DPO with noisy preferences",
      https://ericmitchell.ai/cdpo.pdf): ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``,
      as TRL's sigmoid loss computed it before 1.0.
    - ipo: ``(h' - 1 / (2 beta))^2`` (Azar et al. 2023, eq. 17), where ``h'`` uses the log-ratios
      averaged per response token (``*_lengths``), as TRL's DPOTrainer does (trl/trainer/
      dpo_trainer.py, loss_type "ipo").
    """
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    if loss_type == "sigmoid":
        h = beta * (chosen_ratio - rejected_ratio)
        loss = -(1.0 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("the ipo loss needs the response lengths")
        h = chosen_ratio / chosen_lengths.clamp(min=1) - rejected_ratio / rejected_lengths.clamp(
            min=1
        )
        loss = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}; expected sigmoid or ipo")
    return DPOLossOutput(
        loss=loss,
        chosen_rewards=beta * chosen_ratio.detach(),
        rejected_rewards=beta * rejected_ratio.detach(),
    )
