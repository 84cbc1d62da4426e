"""From a rollout batch to per-token rewards, advantages and returns (no I/O, no model)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from policy_trainer.advantages import (
    gae,
    grpo_advantages,
    per_token_rewards,
    rloo_advantages,
    whiten_advantages,
)
from policy_trainer.config import PPOConfig
from policy_trainer.masked_stats import masked_mean, masked_whiten
from policy_trainer.rollout import RolloutBatch


@dataclass
class Experience:
    """What the PPO update consumes besides the rollout batch."""

    advantages: torch.Tensor
    """[N, R] (whitened if configured), 0 on padding and on dropped sequences."""
    returns: torch.Tensor | None
    """[N, R] value targets (gae only)."""
    mask: torch.Tensor
    """[N, R] float: response tokens of the sequences that take part in the update."""
    stats: dict[str, float]
    """Per-iteration statistics (means over the sequences that count)."""
    kl_sum: float
    """Sum over valid sequences of the per-sequence KL (for the KL controller)."""
    n_valid: int
    """Sequences that count."""


def final_scores(
    scores: torch.Tensor,
    has_eos: torch.Tensor,
    missing_eos_penalty: float | None,
    clip: float | None,
) -> torch.Tensor:
    """Scores with the missing-EOS penalty subtracted (TRL ``missing_eos_penalty``, as in Huang et
    al. 2024, "The N+ Implementation Details of RLHF with PPO", https://arxiv.org/abs/2403.17031)
    and then clipped to [-clip, clip] (OpenRLHF ``reward_clip_range``). NaN stays NaN.
    [N] -> [N]."""
    out = scores.clone()
    if missing_eos_penalty is not None:
        out = torch.where(has_eos, out, out - missing_eos_penalty)
    if clip is not None:
        out = out.clamp(min=-clip, max=clip)
    return out


def make_experience(
    batch: RolloutBatch,
    cfg: PPOConfig,
    beta: float,
    samples_per_prompt: int,
    missing_eos_penalty: float | None,
) -> Experience:
    """Per-token rewards (score at the EOS, ``-beta * KL`` everywhere), then GAE or a group
    baseline. Sequences without a server score or reference log-probs are dropped from
    everything (rewards, baselines, whitening, losses, statistics)."""
    scores = final_scores(batch.scores, batch.has_eos, missing_eos_penalty, cfg.score_clip)  # [N]
    valid = batch.valid & torch.isfinite(scores)  # [N]
    mask = batch.response_mask.float() * valid.unsqueeze(1).float()  # [N, R]
    rewards, kl = per_token_rewards(
        batch.old_logprobs, batch.ref_logprobs, mask, scores, beta, cfg.kl_estimator, cfg.kl_clamp
    )  # [N, R], [N, R]
    if cfg.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    returns = None
    if cfg.advantage_estimator == "gae":
        if batch.old_values is None:
            raise ValueError("gae needs values; the model has no value function")
        advantages, returns = gae(rewards, batch.old_values, mask, cfg.gamma, cfg.lam)
    else:
        seq_reward = rewards.sum(dim=1)  # [N]: score - beta * sum_t KL_t
        fn = rloo_advantages if cfg.advantage_estimator == "rloo" else grpo_advantages
        seq_adv, group_ok = fn(seq_reward, samples_per_prompt, valid)  # [N], [N]
        valid = valid & group_ok
        mask = mask * group_ok.unsqueeze(1).float()
        advantages = seq_adv.unsqueeze(1) * mask  # [N, R]: one advantage for every token
    if cfg.whiten_advantages:
        advantages = whiten_advantages(advantages, mask)
    seq_kl = kl.sum(dim=1)  # [N]
    n_valid = int(valid.sum())
    validf = valid.float()
    lengths = batch.response_mask.sum(dim=1).float()  # [N]
    stats = {
        "reward_mean": float(masked_mean(torch.nan_to_num(scores), validf)),
        "score_raw_mean": float(masked_mean(torch.nan_to_num(batch.scores), validf)),
        "kl_mean": float(masked_mean(seq_kl, validf)),
        "non_score_reward_mean": float(masked_mean(-beta * seq_kl, validf)),
        "advantage_mean": float(masked_mean(advantages, mask)),
        "response_length_mean": float(lengths.mean()),
        "eos_rate": float(batch.has_eos.float().mean()),
        "valid_fraction": float(validf.mean()),
    }
    if returns is not None:
        stats["return_mean"] = float(masked_mean(returns, mask))
        stats["value_mean"] = float(masked_mean(batch.old_values, mask))
    return Experience(
        advantages=advantages,
        returns=returns,
        mask=mask,
        stats=stats,
        kl_sum=float((seq_kl * validf).sum()),
        n_valid=n_valid,
    )
