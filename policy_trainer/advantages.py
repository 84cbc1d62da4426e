"""Per-token rewards and advantage estimators (pure functions, no I/O).

Conventions: responses are right-padded, ``mask`` [B, T] is 1 on response tokens up to and
including the first EOS (or the last sampled token when there is none), 0 after.
"""

from __future__ import annotations

import torch

from policy_trainer.kl import kl_estimate
from policy_trainer.masked_stats import masked_whiten


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last set position of each row of ``mask`` [B, T] -> [B] (0 for empty rows)."""
    lengths = mask.to(torch.long).sum(dim=1)  # [B]
    return (lengths - 1).clamp(min=0)


def per_token_rewards(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    scores: torch.Tensor,
    beta: float,
    estimator: str = "k1",
    kl_clamp: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``r_t = -beta * KL_t`` on every response token, plus the score on the last one (the EOS).

    Ziegler et al. 2019 eq. 2 / TRL ``ppo_trainer.py`` (``rewards[..., sequence_lengths_p1] +=
    scores``), OpenRLHF ``compute_reward`` (score on the last position of the action mask).
    ``logp``, ``ref_logp``, ``mask``: [B, T]; ``scores``: [B]. Non-finite scores (a score the server
    could not return) add nothing here: the caller must drop those rows from the loss via ``mask``.
    Returns ``(rewards [B, T], kl [B, T])``, both zero on padding.
    """
    maskf = mask.to(logp.dtype)
    kl = kl_estimate(logp, ref_logp, estimator, clamp=kl_clamp) * maskf  # [B, T]
    rewards = -beta * kl  # [B, T]
    last = last_token_index(mask)  # [B]
    safe_scores = torch.where(torch.isfinite(scores), scores, torch.zeros_like(scores))  # [B]
    has_tokens = (maskf.sum(dim=1) > 0).to(logp.dtype)  # [B]
    rewards = rewards.scatter_add(
        1, last.unsqueeze(1), (safe_scores * has_tokens).unsqueeze(1).to(logp.dtype)
    )
    return rewards, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16), cleanrl ``ppo.py``.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` with ``V = 0`` after the last response token;
    ``A_t = delta_t + gamma * lam * A_{t+1}``; returns ``A + V``. All inputs [B, T] -> ([B, T], [B, T]),
    advantages and returns are 0 on padding. Not whitened (see ``masked_whiten``).
    """
    maskf = mask.to(values.dtype)
    values = values * maskf  # [B, T]: values past the end are zero (TRL padding_mask_p1)
    rewards = rewards * maskf  # [B, T]
    t_len = rewards.shape[1]
    last_gae = torch.zeros_like(rewards[:, 0])  # [B]
    advantages_reversed = []
    for t in reversed(range(t_len)):
        next_value = values[:, t + 1] if t + 1 < t_len else torch.zeros_like(values[:, 0])  # [B]
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # [B]
        last_gae = delta + gamma * lam * last_gae
        advantages_reversed.append(last_gae)
    advantages = torch.stack(advantages_reversed[::-1], dim=1) * maskf  # [B, T]
    returns = (advantages + values) * maskf  # [B, T]
    return advantages, returns


def _grouped(
    rewards: torch.Tensor, valid: torch.Tensor | None, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """[N] rewards (samples of one prompt contiguous) -> ([G, k] rewards, [G, k] float valid)."""
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"expected a 1-D tensor whose length is a multiple of group_size={group_size}, "
            f"got shape {tuple(rewards.shape)}"
        )
    if valid is None:
        valid = torch.isfinite(rewards)
    valid = valid & torch.isfinite(rewards)
    r = torch.where(valid, rewards, torch.zeros_like(rewards)).view(-1, group_size)  # [G, k]
    return r, valid.view(-1, group_size).to(rewards.dtype)


def rloo_advantages(
    rewards: torch.Tensor, group_size: int, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE leave-one-out (Ahmadian et al. 2024; TRL ``rloo_trainer.py``): the baseline of a
    sample is the mean reward of the other k-1 samples of its prompt.

    ``rewards``: [N] with the k samples of each prompt contiguous; ``valid`` [N] bool (default:
    finite rewards). Invalid samples are left out of their group's baselines; a group with fewer
    than 2 valid samples has no baseline. Returns ``(advantages [N], valid [N] bool)``.
    """
    r, v = _grouped(rewards, valid, group_size)  # [G, k]
    n_valid = v.sum(dim=1, keepdim=True)  # [G, 1]
    baseline = (r.sum(dim=1, keepdim=True) - r) / (n_valid - 1).clamp(min=1)  # [G, k]
    ok = (v > 0) & (n_valid >= 2)  # [G, k]
    adv = torch.where(ok, r - baseline, torch.zeros_like(r))
    return adv.view(-1), ok.view(-1)


def grpo_advantages(
    rewards: torch.Tensor, group_size: int, valid: torch.Tensor | None = None, eps: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO group baseline (Shao et al. 2024, DeepSeekMath section 4.1.2; TRL ``grpo_trainer.py``):
    ``A = (r - mean) / (std + eps)`` within the k samples of a prompt, std unbiased (n - 1).

    Same conventions as ``rloo_advantages``. Returns ``(advantages [N], valid [N] bool)``.
    """
    r, v = _grouped(rewards, valid, group_size)  # [G, k]
    n_valid = v.sum(dim=1, keepdim=True)  # [G, 1]
    mean = (r * v).sum(dim=1, keepdim=True) / n_valid.clamp(min=1)  # [G, 1]
    var = (((r - mean) * v) ** 2).sum(dim=1, keepdim=True) / (n_valid - 1).clamp(min=1)  # [G, 1]
    ok = (v > 0) & (n_valid >= 2)  # [G, k]
    adv = torch.where(ok, (r - mean) / (var.sqrt() + eps), torch.zeros_like(r))
    return adv.view(-1), ok.view(-1)


def whiten_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Advantages are always whitened with the mean shifted (Huang et al. 2024, "The N+
    Implementation Details of RLHF with PPO", https://arxiv.org/abs/2403.17031)."""
    return masked_whiten(advantages, mask, shift_mean=True)
