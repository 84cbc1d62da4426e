"""`reward-server train` end to end on CPU: it learns a known preference, writes its run files and a
checkpoint plain `transformers` loads, and is deterministic for a seed.

Synthetic task: the hidden scoring function is the number of times the word "good" appears in the
completion; pairs and K=4 rankings are labelled by it. A 2-layer, 64-wide GPT-2 (random weights,
byte-level BPE, from `reward_server.tiny`) with a fresh reward head learns it in 3 short epochs:
held-out pairwise accuracy measured 1.00 on CPU (103 held-out pairs, seed 0; 0.94 after the
first epoch); the test requires >= 0.85 (chance: 0.5).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from reward_server.tiny import WORDS
from reward_server.training.cli import main

pytestmark = pytest.mark.integration

FILLER = [w for w in WORDS if w not in ("good", "bad")]
ACCURACY_THRESHOLD = 0.85


def gold_score(completion: str) -> int:
    """The known scoring function the preferences come from."""
    return completion.split().count("good")


def _completion(rng: random.Random, n_good: int) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(4, 12))]
    for _ in range(n_good):
        words.insert(rng.randrange(len(words) + 1), "good")
    return " " + " ".join(words)


def synthetic_preferences(n_pairs: int, n_rankings: int, seed: int) -> list[dict]:
    """Pairs and K=4 rankings whose labels come from `gold_score`."""
    rng = random.Random(seed)
    recs: list[dict] = []
    for i in range(n_pairs + n_rankings):
        prompt = f"question {i}: " + " ".join(rng.choice(FILLER) for _ in range(3)) + " answer:"
        if i < n_pairs:
            a, b = rng.sample(range(4), 2)
            ca, cb = _completion(rng, a), _completion(rng, b)
            chosen, rejected = (ca, cb) if gold_score(ca) > gold_score(cb) else (cb, ca)
            recs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": 1.0})
        else:
            responses = [_completion(rng, g) for g in rng.sample(range(4), 4)]
            ranking = sorted(range(4), key=lambda j: -gold_score(responses[j]))
            recs.append({"prompt": prompt, "responses": responses, "ranking": ranking})
    rng.shuffle(recs)
    return recs


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["train", *argv, "--no-progress"])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def base_lm(tiny_ckpts) -> str:
    return str(tiny_ckpts.reference)  # a causal LM: the reward head starts random


@pytest.fixture(scope="module")
def trained(base_lm, tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("rm_learn")
    data = write_jsonl(d / "prefs.jsonl", synthetic_preferences(300, 40, seed=0))
    rng = random.Random(1)
    norm_recs = [
        {"prompt": "question: x answer:", "completion": _completion(rng, i % 4)} for i in range(50)
    ]
    norm = write_jsonl(d / "norm.jsonl", norm_recs)
    out = d / "rm"
    argv = ["--data", data, "--base-model", base_lm, "--output", str(out), "--epochs", "3",
            "--batch-size", "16", "--lr", "1e-3", "--eval-fraction", "0.2", "--max-length", "64",
            "--seed", "0", "--norm-data", norm]  # fmt: skip
    rc, stdout, stderr = run_cli(argv)
    assert rc == 0, stderr
    return {"out": out, "stdout": stdout, "norm": norm_recs}


def test_learns_the_known_preference(trained) -> None:
    lines = [json.loads(x) for x in (trained["out"] / "metrics.jsonl").read_text().splitlines()]
    final = lines[-1]
    assert final["eval_accuracy"] >= ACCURACY_THRESHOLD, lines
    assert final["eval_loss"] < math.log(2) / 2, lines  # well below the loss of a constant model
    assert f"held-out accuracy {final['eval_accuracy']:.4f}" in trained["stdout"]


def test_run_files(trained) -> None:
    out = trained["out"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [ln["epoch"] for ln in lines] == [1, 2, 3]
    assert [ln["step"] for ln in lines] == [
        1 * lines[0]["step"],
        2 * lines[0]["step"],
        3 * lines[0]["step"],
    ]
    for ln in lines:
        assert {"epoch", "step", "train_loss", "eval_loss", "eval_accuracy"} <= set(ln)
        assert isinstance(ln["train_loss"], float) and 0 <= ln["eval_accuracy"] <= 1
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "base_model" in (out / "train_config.yaml").read_text()
    assert "data: 340 records (pairs 300, rankings 40)" in trained["stdout"]


def test_checkpoint_loads_with_plain_transformers_and_records_normalisation(trained) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = trained["out"]
    assert (out / "model.safetensors").is_file()
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    cfg = json.loads((out / "config.json").read_text())
    stats = cfg["reward_normalization"]
    assert set(stats) == {"mean", "std", "count"} and stats["count"] == 50
    assert isinstance(stats["mean"], float) and stats["std"] > 0
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert model.config.num_labels == 1
    assert model.config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    # Statistics = mean and population std of the reward over the reference completions, each
    # scored alone (no padding) as prompt + completion.
    with torch.no_grad():
        rewards = [
            float(model(**tok(r["prompt"] + r["completion"], return_tensors="pt")).logits[0, 0])
            for r in trained["norm"]
        ]
    assert stats["mean"] == pytest.approx(float(np.mean(rewards)), abs=1e-5)
    assert stats["std"] == pytest.approx(float(np.std(rewards)), abs=1e-5)
    # The trained model ranks fresh completions by the hidden score.
    rng = random.Random(7)
    texts = [("question: y answer:", _completion(rng, g)) for g in (0, 3, 1, 2)]
    with torch.no_grad():
        r = [float(model(**tok(p + c, return_tensors="pt")).logits[0, 0]) for p, c in texts]
    assert r[1] > r[0]


def test_same_seed_same_run(base_lm, tmp_path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_preferences(48, 8, seed=3))
    results = []
    for name in ("a", "b"):
        out = tmp_path / name
        rc, _, err = run_cli(["--data", data, "--base-model", base_lm, "--output", str(out),
                              "--batch-size", "8", "--lr", "1e-3", "--eval-fraction", "0.25",
                              "--max-length", "64", "--seed", "5"])  # fmt: skip
        assert rc == 0, err
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        results.append(
            (
                [(ln["train_loss"], ln["eval_loss"]) for ln in lines],
                (out / "model.safetensors").read_bytes(),
            )
        )
    assert results[0][0] == results[1][0]
    assert results[0][1] == results[1][1]  # bit-identical weights
