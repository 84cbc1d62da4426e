"""Run outputs: metrics.jsonl (one JSON object per iteration), curves.png, optional TensorBoard."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from policy_trainer.config import ConfigError
from reward_server.reward_stats import (
    NAN,
    drift_sigma,
    mean_std,
    member_rank_correlations,
    min_correlation,
    pearson,
)

REQUIRED_KEYS = (
    "iteration",
    "reward_mean",
    "kl_mean",
    "beta",
    "policy_loss",
    "value_loss",
    "clipfrac",
    "approx_kl",
    "entropy",
    "response_length_mean",
    "eos_rate",
    "rpc_wait_seconds",
    "iteration_seconds",
)
"""Keys every metrics.jsonl line carries."""

WALL_CLOCK_KEYS = frozenset(
    {
        "rpc_wait_seconds",
        "iteration_seconds",
        "generation_seconds",
        "policy_forward_seconds",
        "update_seconds",
        "rpc_wait_share",
        "time",
    }
)
"""Keys that measure time, so differ between otherwise identical runs."""


PPO_PANELS: tuple[tuple[str | tuple[str, ...], str], ...] = (
    ("reward_mean", "reward (score at EOS)"),
    ("kl_mean", "KL(policy || reference) per sequence"),
    ("beta", "KL coefficient beta"),
)
"""The PPO run's curves.png panels: (metric key or keys, title)."""


def telemetry_metrics(
    scores: Sequence[float],
    lengths: Sequence[float],
    members: Sequence[str] = (),
    member_scores: Sequence[Sequence[float]] = (),
) -> dict[str, float]:
    """The reward-hacking figures of one iteration's rollouts, with the functions the server's
    telemetry uses (`reward_server.reward_stats`; docs/DEPLOY.md, "Reward-hacking telemetry"):
    ``telemetry/score_mean`` and ``telemetry/score_std`` (the scores the run trains on),
    ``telemetry/length_corr`` (Pearson's r of score against the completion's length in policy
    tokens) and, when the reward is a combination, ``telemetry/member_rank_corr`` (the lowest
    Spearman's rho between two members' scores of the same items). Lost scores (NaN) are left
    out."""
    keep = [i for i, s in enumerate(scores) if math.isfinite(s)]
    s = [float(scores[i]) for i in keep]
    mean, std = mean_std(s)
    out = {
        "telemetry/score_mean": mean,
        "telemetry/score_std": std,
        "telemetry/length_corr": pearson(s, [float(lengths[i]) for i in keep]),
    }
    if len(members) >= 2:
        corr = member_rank_correlations(members, member_scores)
        out["telemetry/member_rank_corr"] = min_correlation(corr)
    return out


def add_score_drift(metrics: dict[str, Any], history: Sequence[dict[str, Any]]) -> None:
    """``telemetry/score_drift_sigma``: how far this iteration's mean score lies from the run's
    first iteration's (the baseline, kept in metrics.jsonl, so a resumed run keeps it), in the
    first iteration's standard deviations."""
    first = next((m for m in history if m.get("telemetry/score_std") is not None), metrics)
    base_std = first.get("telemetry/score_std")
    metrics["telemetry/score_drift_sigma"] = drift_sigma(
        metrics["telemetry/score_mean"],
        first["telemetry/score_mean"],
        NAN if base_std is None else base_std,
    )


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All lines of a metrics.jsonl."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunLogger:
    """Writes the run's metrics (rank 0 only; the other ranks pass ``enabled=False``)."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        tensorboard: bool,
        resume_after: int | None,
        *,
        step_key: str = "iteration",
        panels: tuple[tuple[str | tuple[str, ...], str], ...] = PPO_PANELS,
    ):
        self.run_dir = run_dir
        self.enabled = enabled
        self.step_key, self.panels = step_key, panels
        self.path = run_dir / "metrics.jsonl"
        self.history: list[dict[str, Any]] = []
        self.tb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_after is None:
            self.path.write_text("")
        else:
            # drop iterations past the checkpoint (they will be redone), keep the rest
            kept = [m for m in read_metrics(self.path) if m.get(step_key, 0) <= resume_after]
            self.path.write_text("".join(json.dumps(m) + "\n" for m in kept))
            self.history = kept
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "run.tensorboard: the tensorboard package is not installed"
                ) from None
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, metrics: dict[str, Any]) -> None:
        """Append one iteration."""
        if not self.enabled:
            return
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in metrics.items()
        }
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        self.history.append(clean)
        if self.tb is not None:
            step = int(metrics[self.step_key])
            for k, v in clean.items():
                if isinstance(v, (int, float)) and k != self.step_key and v is not None:
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def plot(self) -> None:
        """Redraw curves.png: one panel per entry of ``panels`` (a key, or several keys drawn
        together), against the step key."""
        if not self.enabled or not self.history:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(self.panels), figsize=(4.4 * len(self.panels), 3.6))
        for ax, (keys, title) in zip(axes, self.panels, strict=True):
            for key in (keys,) if isinstance(keys, str) else keys:
                rows = [m for m in self.history if m.get(key) is not None]
                ax.plot(
                    [m[self.step_key] for m in rows],
                    [m[key] for m in rows],
                    marker="o",
                    ms=3,
                    label=key,
                )
            if not isinstance(keys, str):
                ax.legend(fontsize=7)
            ax.set_title(title)
            ax.set_xlabel(self.step_key)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        tmp = self.run_dir / "curves.png.tmp.png"
        fig.savefig(tmp, dpi=90)
        plt.close(fig)
        tmp.replace(self.run_dir / "curves.png")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
