"""Preference data for the demo: pairs sampled from the SFT policy, labelled by the gold function
with Bradley-Terry noise, P(a preferred over b) = sigmoid(g_a - g_b)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from policy_trainer.demo.sft import Sample, sample
from policy_trainer.demo.task import gold_reward, sample_prompts


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def write_pairs(
    path: Path, pairs: list[tuple[Sample, Sample]], rng: random.Random
) -> tuple[float, float]:
    """Label and write pairs as {"prompt","chosen","rejected"} JSONL; return the Bayes ceiling
    (the accuracy of a perfect model of the gold function on these noisy labels, in expectation)
    and the gold function's accuracy on the labels actually drawn (ties count half)."""
    ceiling = hits = 0.0
    with open(path, "w") as fh:
        for a, b in pairs:
            p_a = _sigmoid(
                gold_reward(a.prompt, a.words, a.has_eos)
                - gold_reward(b.prompt, b.words, b.has_eos)
            )
            ceiling += max(p_a, 1.0 - p_a)
            chosen, rejected = (a, b) if rng.random() < p_a else (b, a)
            hits += 0.5 if p_a == 0.5 else float((p_a > 0.5) == (chosen is a))
            fh.write(
                json.dumps(
                    {"prompt": a.prompt.text, "chosen": chosen.text, "rejected": rejected.text}
                )
                + "\n"
            )
    return ceiling / max(1, len(pairs)), hits / max(1, len(pairs))


def build_preferences(
    sft_dir: Path, out_dir: Path, *, n_train: int, n_heldout: int, seed: int
) -> dict[str, float | str]:
    """Sample two responses per prompt from the SFT model, label, and split train / held-out.

    Pairs whose texts are identical or empty are skipped (they carry no preference)."""
    rng = random.Random(seed + 1)
    n = int((n_train + n_heldout) * 1.3) + 16
    prompts = sample_prompts(n, rng)
    first = sample(sft_dir, prompts, seed=seed + 2)
    second = sample(sft_dir, prompts, seed=seed + 3)
    pairs = [
        (a, b) for a, b in zip(first, second, strict=True) if a.text and b.text and a.text != b.text
    ]
    if len(pairs) < n_train + n_heldout:
        raise RuntimeError(f"only {len(pairs)} usable pairs, need {n_train + n_heldout}")
    out_dir.mkdir(parents=True, exist_ok=True)
    train_path, heldout_path = out_dir / "prefs_train.jsonl", out_dir / "prefs_heldout.jsonl"
    write_pairs(train_path, pairs[:n_train], rng)
    ceiling, gold_acc = write_pairs(heldout_path, pairs[n_train : n_train + n_heldout], rng)
    return {
        "train": str(train_path),
        "heldout": str(heldout_path),
        "bayes_ceiling": ceiling,
        "gold_accuracy": gold_acc,
    }
