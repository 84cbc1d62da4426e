"""Reward-model losses against hand-computed values (reward_server.training.losses)."""

from __future__ import annotations

import math

import pytest
import torch

from reward_server.training.data import ranking_pairs
from reward_server.training.losses import (
    bradley_terry_loss,
    centering_loss,
    grouped_pair_loss,
    pair_accuracy,
    pairwise_losses,
)


def test_bradley_terry_value() -> None:
    # -log sigmoid(0.6) = log(1 + e^-0.6)
    loss = bradley_terry_loss(
        torch.tensor([0.6], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64)
    )
    assert float(loss) == pytest.approx(0.4374879505, abs=1e-9)


def test_margin_value() -> None:
    # Llama 2 margin: -log sigmoid(0.6 - 1) = -log sigmoid(-0.4)
    loss = bradley_terry_loss(
        torch.tensor([0.6], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64), 1.0
    )
    assert float(loss) == pytest.approx(0.9130152524, abs=1e-9)


def test_ranking_value_k4() -> None:
    # Ranking best-first [0, 1, 2, 3] with rewards [2, 1, 0.5, -1]: mean over its 6 pairs.
    rewards = torch.tensor([2.0, 1.0, 0.5, -1.0], dtype=torch.float64)
    pairs = ranking_pairs([0, 1, 2, 3])
    chosen = torch.tensor([w for w, _ in pairs])
    rejected = torch.tensor([lo for _, lo in pairs])
    group = torch.zeros(6, dtype=torch.long)
    loss = grouped_pair_loss(rewards, chosen, rejected, group, 1)
    assert float(loss) == pytest.approx(0.2276134317, abs=1e-9)
    # Independent check by hand: sum over pairs of log(1 + exp(-(r_w - r_l))) / 6.
    r = [2.0, 1.0, 0.5, -1.0]
    expect = sum(math.log1p(math.exp(-(r[i] - r[j]))) for i in range(4) for j in range(i + 1, 4))
    assert float(loss) == pytest.approx(expect / 6, abs=1e-12)


def test_grouped_loss_averages_within_group_then_over_groups() -> None:
    # Group 0: one pair (delta 0.6); group 1: the K=4 ranking. Each group weighs the same,
    # so the result is the mean of the two group losses, not the mean over the 7 pairs.
    rewards = torch.tensor([1.1, 0.5, 2.0, 1.0, 0.5, -1.0], dtype=torch.float64)
    pairs = [(0, 1)] + [(2 + w, 2 + lo) for w, lo in ranking_pairs([0, 1, 2, 3])]
    chosen = torch.tensor([p[0] for p in pairs])
    rejected = torch.tensor([p[1] for p in pairs])
    group = torch.tensor([0] + [1] * 6)
    loss = grouped_pair_loss(rewards, chosen, rejected, group, 2)
    assert float(loss) == pytest.approx((0.4374879505 + 0.2276134317) / 2, abs=1e-9)
    per_pair_mean = float(pairwise_losses(rewards[chosen], rewards[rejected]).mean())
    assert float(loss) != pytest.approx(per_pair_mean, abs=1e-4)


def test_grouped_loss_with_margin_and_empty_group() -> None:
    rewards = torch.tensor([0.6, 0.0])
    idx = torch.tensor([0]), torch.tensor([1]), torch.tensor([0])
    loss = grouped_pair_loss(rewards, *idx, 1, margin=torch.tensor([1.0]))
    assert float(loss) == pytest.approx(0.9130152524, abs=1e-6)
    with pytest.raises(ValueError, match="at least one pair"):
        grouped_pair_loss(rewards, *idx, 2)


def test_loss_is_stable_for_large_deltas_and_has_right_gradient() -> None:
    chosen = torch.tensor([-60.0, 60.0], requires_grad=True)
    rejected = torch.tensor([60.0, -60.0])
    losses = pairwise_losses(chosen, rejected)
    losses.sum().backward()
    values = losses.detach()
    assert torch.isfinite(values).all()
    assert float(values[0]) == pytest.approx(120.0, rel=1e-6)
    assert float(values[1]) == pytest.approx(0.0, abs=1e-20)
    # d/dr_c of -log sigmoid(d) = -(1 - sigmoid(d)): -1 when badly wrong, ~0 when right.
    assert chosen.grad.tolist() == pytest.approx([-1.0, 0.0], abs=1e-9)


def test_centering_and_accuracy() -> None:
    r = torch.tensor([1.0, -3.0, 2.0])
    assert float(centering_loss(r, 0.01)) == pytest.approx(0.01 * (1 + 9 + 4) / 3)
    acc = pair_accuracy(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 1.0, 2.0]))
    assert acc.tolist() == [1.0, 0.0, 0.5]
