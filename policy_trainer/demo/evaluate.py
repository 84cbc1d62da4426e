"""Demo evaluation: SFT vs final policy on fixed prompts (gold, proxy, EOS rate, win-rate), and the
curves plot (proxy and gold reward against KL)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np

from policy_trainer.demo.sft import Sample, sample
from policy_trainer.demo.task import gold_reward, sample_prompts


def golds(samples: list[Sample]) -> np.ndarray:
    """Gold reward of each sample."""
    return np.array([gold_reward(s.prompt, s.words, s.has_eos) for s in samples])


def proxy(client: Any, samples: list[Sample], missing_eos_penalty: float) -> np.ndarray:
    """Reward-model score of each sample over RPC, with the trainer's missing-EOS penalty; an empty
    response (EOS only) gets the penalty-free minimum of the batch, as it cannot be scored."""
    idx = [i for i, s in enumerate(samples) if s.text]
    scores = np.full(len(samples), np.nan)
    res = client.score([(samples[i].prompt.text, samples[i].text) for i in idx])
    for i, r in zip(idx, res, strict=True):
        scores[i] = r.score - (0.0 if samples[i].has_eos else missing_eos_penalty)
    scores[np.isnan(scores)] = np.nanmin(scores) if len(idx) else 0.0
    return scores


def compare(
    sft_dir: Path,
    policy_dir: Path,
    client: Any,
    *,
    n: int,
    seed: int,
    max_new_tokens: int,
    missing_eos_penalty: float,
) -> dict[str, float]:
    """Sample both policies on the same prompts; gold/proxy means, EOS rates, gold win-rate."""
    prompts = sample_prompts(n, random.Random(seed + 100))
    before = sample(sft_dir, prompts, seed=seed + 101, max_new_tokens=max_new_tokens)
    after = sample(policy_dir, prompts, seed=seed + 102, max_new_tokens=max_new_tokens)
    g0, g1 = golds(before), golds(after)
    p0, p1 = proxy(client, before, missing_eos_penalty), proxy(client, after, missing_eos_penalty)
    wins = float(np.mean((g1 > g0) + 0.5 * (g1 == g0)))
    return {
        "gold_reward_sft": float(g0.mean()),
        "gold_reward_final": float(g1.mean()),
        "proxy_reward_sft": float(p0.mean()),
        "proxy_reward_final": float(p1.mean()),
        "eos_rate_sft": float(np.mean([s.has_eos for s in before])),
        "eos_rate_final": float(np.mean([s.has_eos for s in after])),
        "gold_win_rate_vs_sft": wins,
        "response_length_sft": float(np.mean([len(s.words) for s in before])),
        "response_length_final": float(np.mean([len(s.words) for s in after])),
        "examples_final": [f"{s.prompt.text} {s.text}" for s in after[:5]],
    }


def plot_curves(metrics: list[dict[str, Any]], path: Path, title: str) -> None:
    """Proxy (reward model) and gold reward of the policy's samples against KL, and over iterations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it = [m["iteration"] for m in metrics]
    kl = [m["kl_mean"] for m in metrics]
    prox = [m["reward_mean"] for m in metrics]
    gold = [m.get("gold_reward_mean", float("nan")) for m in metrics]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    ax = axes[0]
    ax.plot(kl, prox, "o-", ms=3, label="proxy (reward model)")
    ax.plot(kl, gold, "s-", ms=3, label="gold")
    ax.set_xlabel("KL(policy || reference), nats per sequence")
    ax.set_ylabel("reward of the policy's samples")
    ax.legend()
    ax.grid(alpha=0.3)
    ax.set_title("reward against KL")
    ax = axes[1]
    ax.plot(it, prox, label="proxy")
    ax.plot(it, gold, label="gold")
    ax2 = ax.twinx()
    ax2.plot(it, kl, color="gray", ls="--", label="KL")
    ax2.set_ylabel("KL (nats)")
    ax.set_xlabel("PPO iteration")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    ax.set_title("over iterations")
    ax = axes[2]  # the trainer's reward-hacking telemetry (metrics.jsonl telemetry/...)

    def series(key: str) -> list[float]:
        return [float("nan") if m.get(key) is None else m[key] for m in metrics]

    ax.plot(it, series("telemetry/length_corr"), label="corr(score, length)")
    ax.set_ylim(-1.05, 1.05)
    ax.set_ylabel("Pearson r")
    ax2 = ax.twinx()
    ax2.plot(it, series("telemetry/score_drift_sigma"), color="C3", label="score drift")
    ax2.set_ylabel("score drift (first-iteration sigmas)")
    ax.set_xlabel("PPO iteration")
    ax.legend(loc="upper left", fontsize=8)
    ax2.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title("reward-hacking telemetry")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
