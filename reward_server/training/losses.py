"""Reward-model losses: Bradley-Terry pairwise loss, per-prompt averaging, reward centering.

Pure tensor functions, no I/O. A batch is a flat vector of rewards (one per scored text) plus an
index of pairs into it, so a ranking of K responses costs K forwards, not 2 * C(K, 2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_losses(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Per-pair Bradley-Terry loss ``-log sigmoid(r_chosen - r_rejected - margin)``.

    The margin term is Llama 2's (Touvron et al. 2023, section 3.2.2): a pair rated "significantly
    better" must be separated by at least ``margin`` before its loss gets small.
    ``chosen``, ``rejected``: [P]; ``margin``: [P], a scalar or None. Returns [P].
    """
    delta = chosen - rejected  # [P]
    if margin is not None:
        delta = delta - margin
    # logsigmoid is the numerically stable form of log(sigmoid(x)) for large |x|.
    return -F.logsigmoid(delta)  # [P]


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Mean over pairs of `pairwise_losses` (the default reward-model loss). Returns a scalar."""
    return pairwise_losses(chosen, rejected, margin).mean()


def grouped_pair_loss(
    rewards: torch.Tensor,
    chosen_idx: torch.Tensor,
    rejected_idx: torch.Tensor,
    group_idx: torch.Tensor,
    num_groups: int,
    margin: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bradley-Terry loss averaged within each group, then over groups.

    InstructGPT (Ouyang et al. 2022, section 3.5): all C(K, 2) comparisons of one prompt are one
    batch element, ``loss = -1/C(K,2) * E[sum log sigmoid(r_w - r_l)]``; shuffling the pairs apart
    made the reward model overfit. A plain pair is a group of one, so for pair data this is the mean
    over pairs.

    ``rewards``: [N] one per text; ``chosen_idx``, ``rejected_idx``, ``group_idx``: [P] long;
    ``margin``: [P] or None. Every group in ``range(num_groups)`` must own at least one pair.
    """
    per_pair = pairwise_losses(rewards[chosen_idx], rewards[rejected_idx], margin)  # [P]
    sums = torch.zeros(num_groups, dtype=per_pair.dtype, device=per_pair.device)  # [G]
    sums = sums.index_add(0, group_idx, per_pair)  # [G]
    counts = torch.bincount(group_idx, minlength=num_groups).to(per_pair.dtype)  # [G]
    if bool((counts == 0).any()):
        raise ValueError("every group must contain at least one pair")
    return (sums / counts).mean()


def centering_loss(rewards: torch.Tensor, coef: float) -> torch.Tensor:
    """Reward-centering term ``coef * mean(r^2)`` over all scored texts of the batch.

    Eisenstein et al. 2023, "Helping or Herding? Reward Model Ensembles Mitigate but do not
    Eliminate Reward Hacking": an auxiliary loss keeps rewards near zero, since the Bradley-Terry
    loss only fixes their differences. (TRL's ``center_rewards_coefficient`` squares the sum of the
    pair instead; this project follows its issue: the mean of r^2.)
    """
    return coef * rewards.pow(2).mean()


def pair_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair accuracy: 1 when ``r_chosen > r_rejected``, 0.5 on a tie, else 0. Returns [P]."""
    return (chosen > rejected).to(torch.float32) + 0.5 * (chosen == rejected).to(torch.float32)
