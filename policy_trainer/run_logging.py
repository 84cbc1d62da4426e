"""Run outputs: metrics.jsonl (one JSON object per iteration), curves.png, optional TensorBoard."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from policy_trainer.config import ConfigError

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


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All lines of a metrics.jsonl."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunLogger:
    """Writes the run's metrics (rank 0 only; the other ranks pass ``enabled=False``)."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_after: int | None):
        self.run_dir = run_dir
        self.enabled = enabled
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
            kept = [m for m in read_metrics(self.path) if m.get("iteration", 0) <= resume_after]
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
            step = int(metrics["iteration"])
            for k, v in clean.items():
                if isinstance(v, (int, float)) and k != "iteration" and v is not None:
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def plot(self) -> None:
        """Redraw curves.png: reward and KL over iterations."""
        if not self.enabled or not self.history:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        it = [m["iteration"] for m in self.history]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        panels = (
            ("reward_mean", "reward (score at EOS)"),
            ("kl_mean", "KL(policy || reference) per sequence"),
            ("beta", "KL coefficient beta"),
        )
        for ax, (key, title) in zip(axes, panels, strict=True):
            ys = [m.get(key) for m in self.history]
            ax.plot(it, [float("nan") if y is None else y for y in ys], marker="o", ms=3)
            ax.set_title(title)
            ax.set_xlabel("iteration")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        tmp = self.run_dir / "curves.png.tmp.png"
        fig.savefig(tmp, dpi=90)
        plt.close(fig)
        tmp.replace(self.run_dir / "curves.png")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
