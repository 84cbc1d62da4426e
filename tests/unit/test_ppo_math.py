"""PPO math against hand-computed values (checked independently, see the issue)."""

from __future__ import annotations

import math

import pytest
import torch

from policy_trainer.advantages import (
    gae,
    grpo_advantages,
    per_token_rewards,
    rloo_advantages,
    whiten_advantages,
)
from policy_trainer.kl import AdaptiveKLController, FixedKLController, kl_estimate
from policy_trainer.losses import entropy_from_logits, logprobs_from_logits, policy_loss, value_loss
from policy_trainer.masked_stats import masked_mean, masked_var, masked_whiten

T = torch.tensor


def close(a: torch.Tensor, b: list[float], atol: float = 1e-6) -> None:
    torch.testing.assert_close(a.double(), T(b, dtype=torch.float64), atol=atol, rtol=0)


LOGP = T([[-1.0, -2.0, -0.5]], dtype=torch.float64)
REF = T([[-1.1, -1.8, -0.8]], dtype=torch.float64)


def test_gae_with_kl_rewards_gamma_1() -> None:
    mask = torch.ones(1, 3)
    rewards, kl = per_token_rewards(LOGP, REF, mask, T([1.0], dtype=torch.float64), beta=0.05)
    close(kl, [[0.1, -0.2, 0.3]])
    close(rewards, [[-0.005, 0.01, 0.985]])
    values = T([[0.5, 0.6, 0.7]], dtype=torch.float64)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    close(adv, [[0.4567125, 0.38075, 0.285]])
    close(ret, [[0.9567125, 0.98075, 0.985]])


def test_gae_discounted() -> None:
    rewards = T([[1.0, 0.0, 2.0]], dtype=torch.float64)
    values = T([[0.5, 0.4, 0.3]], dtype=torch.float64)
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=0.99, lam=0.95)
    close(adv, [[2.30284692, 1.49585, 1.7]])
    close(ret, [[2.80284692, 1.89585, 2.0]])


def test_gae_ignores_padding_and_score_goes_on_last_real_token() -> None:
    """A right-padded row gives the same advantages as the unpadded one; padding gets 0."""
    logp = T([[-1.0, -2.0, -0.5, -3.0, -3.0]], dtype=torch.float64)
    ref = T([[-1.1, -1.8, -0.8, 9.0, 9.0]], dtype=torch.float64)
    mask = T([[1, 1, 1, 0, 0]])
    rewards, kl = per_token_rewards(logp, ref, mask, T([1.0], dtype=torch.float64), beta=0.05)
    close(rewards, [[-0.005, 0.01, 0.985, 0.0, 0.0]])
    values = T([[0.5, 0.6, 0.7, 5.0, 5.0]], dtype=torch.float64)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    close(adv, [[0.4567125, 0.38075, 0.285, 0.0, 0.0]])
    close(ret, [[0.9567125, 0.98075, 0.985, 0.0, 0.0]])


def test_non_finite_score_adds_nothing() -> None:
    rewards, _ = per_token_rewards(
        LOGP, REF, torch.ones(1, 3), T([float("nan")], dtype=torch.float64), beta=0.05
    )
    assert torch.isfinite(rewards).all()
    close(rewards, [[-0.005, 0.01, -0.015]])


def test_adaptive_kl_controller() -> None:
    up = AdaptiveKLController(value=0.15, target=6.0, horizon=10000)
    assert up.update(12.0, 512) == pytest.approx(0.151536, abs=1e-9)
    down = AdaptiveKLController(value=0.15, target=6.0, horizon=10000)
    assert down.update(3.0, 512) == pytest.approx(0.148464, abs=1e-9)
    # inside the clip range the error is proportional: KL 6.6 -> e = 0.1
    mid = AdaptiveKLController(value=0.15, target=6.0, horizon=10000)
    assert mid.update(6.6, 512) == pytest.approx(0.15 * (1 + 0.1 * 512 / 10000), abs=1e-12)
    state = up.state_dict()
    fresh = AdaptiveKLController(value=1.0, target=1.0, horizon=1.0)
    fresh.load_state_dict(state)
    assert fresh == up
    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 512) == 0.05


def test_clipped_policy_loss() -> None:
    adv = T([[1.0, -1.0, 1.0, -1.0]])
    ratio = T([[1.5, 0.5, 0.9, 1.1]])
    old = torch.zeros(1, 4)
    out = policy_loss(ratio.log(), old, adv, torch.ones(1, 4), cliprange=0.2)
    close(out.per_token, [[-1.2, 0.8, -0.9, 1.1]])
    assert out.clipfrac.item() == pytest.approx(0.5)
    assert out.loss.item() == pytest.approx((-1.2 + 0.8 - 0.9 + 1.1) / 4, abs=1e-6)
    expected_approx_kl = 0.5 * sum(math.log(r) ** 2 for r in [1.5, 0.5, 0.9, 1.1]) / 4
    assert out.approx_kl.item() == pytest.approx(expected_approx_kl, rel=1e-5)


def test_policy_loss_masks_padding_and_ratio_one_has_no_clipping() -> None:
    adv = T([[1.0, -1.0, 5.0]])
    logp = T([[-1.0, -2.0, -3.0]])
    out = policy_loss(logp, logp.clone(), adv, T([[1, 1, 0]]), cliprange=0.2)
    assert out.clipfrac.item() == 0.0
    assert out.approx_kl.item() == 0.0
    assert out.ratio_mean.item() == 1.0
    assert out.loss.item() == pytest.approx(0.0)  # (-1 + 1) / 2: the padded 5.0 is ignored


def test_clipped_value_loss() -> None:
    loss, clipfrac = value_loss(T([[1.0]]), T([[0.5]]), T([[0.9]]), T([[1.0]]), 0.2)
    assert loss.item() == pytest.approx(0.02, abs=1e-7)
    assert clipfrac.item() == 1.0
    loss, clipfrac = value_loss(T([[0.6]]), T([[0.5]]), T([[0.9]]), T([[1.0]]), 0.2)
    assert loss.item() == pytest.approx(0.5 * 0.3**2, abs=1e-7)
    assert clipfrac.item() == 0.0


def test_kl_estimators() -> None:
    close(kl_estimate(LOGP, REF, "k3"), [[0.0048374180, 0.0214027582, 0.0408182207]], atol=1e-9)
    close(kl_estimate(LOGP, REF, "k1"), [[0.1, -0.2, 0.3]], atol=1e-9)
    close(kl_estimate(LOGP, REF, "k2"), [[0.005, 0.02, 0.045]], atol=1e-9)
    close(kl_estimate(LOGP, REF, "k1", clamp=0.15), [[0.1, -0.15, 0.15]], atol=1e-9)
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_estimate(LOGP, REF, "k9")


def test_k3_rewards_use_selected_estimator() -> None:
    rewards, kl = per_token_rewards(
        LOGP, REF, torch.ones(1, 3), T([0.0], dtype=torch.float64), beta=1.0, estimator="k3"
    )
    close(rewards, [[-0.0048374180, -0.0214027582, -0.0408182207]], atol=1e-9)


def test_rloo_and_grpo() -> None:
    r = T([1.0, 2.0, 3.0, 6.0])
    adv, ok = rloo_advantages(r, group_size=4)
    close(adv, [-2.666667, -1.333333, 0.0, 4.0], atol=1e-5)
    assert ok.all()
    adv, ok = grpo_advantages(r, group_size=4)
    close(adv, [-0.925777, -0.462889, 0.0, 1.388666], atol=1e-5)
    assert ok.all()


def test_group_baselines_are_per_group_and_skip_invalid_scores() -> None:
    r = T([1.0, 2.0, 3.0, 6.0, 10.0, float("nan"), 20.0, 30.0])
    adv, ok = rloo_advantages(r, group_size=4)
    close(adv[:4], [-2.666667, -1.333333, 0.0, 4.0], atol=1e-5)
    # second group: the NaN is left out, baselines over the other two valid samples
    close(adv[4:], [10.0 - 25.0, 0.0, 20.0 - 20.0, 30.0 - 15.0], atol=1e-5)
    assert ok.tolist() == [True] * 5 + [False] + [True] * 2
    adv, ok = grpo_advantages(T([1.0, float("nan"), 5.0, 7.0]), group_size=2)
    assert ok.tolist() == [False, False, True, True]
    assert adv[:2].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="multiple of group_size"):
        rloo_advantages(T([1.0, 2.0, 3.0]), group_size=2)


def test_masked_whitening() -> None:
    x = T([[1.0, 2.0, 3.0, 100.0]])
    m = T([[1, 1, 1, 0]])
    assert masked_mean(x, m).item() == pytest.approx(2.0)
    assert masked_var(x, m).item() == pytest.approx(1.0)  # unbiased: (1 + 0 + 1) / 2
    assert masked_var(x, m, unbiased=False).item() == pytest.approx(2 / 3)
    w = whiten_advantages(x, m)
    close(w, [[-1.0, 0.0, 1.0, 0.0]], atol=1e-6)
    w = masked_whiten(x, m, shift_mean=False)
    close(w, [[1.0, 2.0, 3.0, 0.0]], atol=1e-6)
    assert masked_mean(x, torch.zeros(1, 4)).item() == 0.0


def test_logprobs_and_entropy_with_temperature() -> None:
    logits = T([[[0.0, math.log(3.0)]]])  # p = [0.25, 0.75] at T = 1
    lp = logprobs_from_logits(logits, T([[1]]))
    assert lp.item() == pytest.approx(math.log(0.75), abs=1e-6)
    lp2 = logprobs_from_logits(logits / 2.0, T([[1]]))  # temperature 2: p ~ [1, sqrt 3]
    assert lp2.item() == pytest.approx(math.log(3**0.5 / (1 + 3**0.5)), abs=1e-6)
    ent = entropy_from_logits(logits)
    assert ent.item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), abs=1e-6)
