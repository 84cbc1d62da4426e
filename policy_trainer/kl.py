"""KL estimators and KL-coefficient controllers (pure functions / small state, no I/O).

Estimators follow John Schulman's note "Approximating KL divergence" (as used by TRL and OpenRLHF
``openrlhf/models/utils.py::compute_approx_kl``), with ``logr = ref_logp - logp`` for tokens sampled
from the policy:
    k1 = -logr                      (unbiased, can be negative per token; TRL PPO default)
    k2 = logr**2 / 2                (biased, low variance)
    k3 = exp(logr) - 1 - logr       (unbiased, always >= 0; GRPO)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(
    logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1", clamp: float | None = None
) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate; ``logp``, ``ref_logp``: [B, T] -> [B, T].

    ``clamp`` bounds the log-ratio first (OpenRLHF clamps k1 to +-10).
    """
    logr = ref_logp - logp  # [B, T]
    if clamp is not None:
        logr = logr.clamp(min=-clamp, max=clamp)
    if estimator == "k1":
        return -logr
    if estimator == "k2":
        return 0.5 * logr**2
    if estimator == "k3":
        return torch.expm1(logr) - logr
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


@dataclass
class FixedKLController:
    """A constant KL coefficient (e.g. 0.03-0.05 for TL;DR in Huang et al. 2024, "The N+
    Implementation Details of RLHF with PPO", https://arxiv.org/abs/2403.17031)."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> float:
        """Nothing changes; returns the coefficient."""
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


@dataclass
class AdaptiveKLController:
    """Ziegler et al. 2019, section 2.2 (lm-human-preferences ``train_policy.py::AdaptiveKLController``):
    ``e = clip(KL / target - 1, -0.2, 0.2)``; ``beta <- beta * (1 + e * n_steps / horizon)``.
    """

    value: float
    target: float
    horizon: float

    def update(self, current_kl: float, n_steps: int) -> float:
        """Move beta toward the KL target after a batch of ``n_steps`` samples; returns new beta."""
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])
