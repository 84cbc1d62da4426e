"""Training curves of a reward-model run: curves.png (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_curves(
    step_losses: list[tuple[int, float]], evals: list[dict[str, Any]], path: str | Path
) -> None:
    """Train loss per optimizer step (with a running mean), eval loss and eval accuracy by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    if step_losses:
        steps, losses = zip(*step_losses, strict=True)
        ax_loss.plot(steps, losses, color="tab:blue", alpha=0.3, lw=0.8, label="train (step)")
        window = max(1, len(losses) // 20)
        smooth = [
            sum(losses[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1))
            for i in range(len(losses))
        ]
        ax_loss.plot(steps, smooth, color="tab:blue", lw=1.5, label=f"train (mean of {window})")
    if evals:
        ev_steps = [e["step"] for e in evals]
        ax_loss.plot(ev_steps, [e["eval_loss"] for e in evals], "o-", color="tab:red", label="eval")
        ax_acc.plot(ev_steps, [e["eval_accuracy"] for e in evals], "o-", color="tab:green")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("Bradley-Terry loss")
    ax_loss.legend()
    ax_loss.set_title("loss")
    ax_acc.axhline(0.5, color="grey", ls="--", lw=0.8)
    ax_acc.set_ylim(0.0, 1.0)
    ax_acc.set_xlabel("optimizer step")
    ax_acc.set_ylabel("pairwise accuracy")
    ax_acc.set_title("held-out accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
