"""`policy-trainer dpo` against a real `reward-server serve` process, tiny models."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from policy_trainer.cli import main
from policy_trainer.dpo import CACHE_NAME, DPOTrainer, pair_sequences
from policy_trainer.dpo_config import load_dpo_config
from policy_trainer.run_logging import WALL_CLOCK_KEYS, read_metrics
from tests.conftest import free_port, start_server
from tests.helpers import inprocess_logprobs
from tests.integration.test_trainer_cli import (  # noqa: F401 - fixture
    SERVER_ENV,
    _restore_torch_threads,
)

pytestmark = pytest.mark.integration

TRL_KEYS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)
WORDS = "the a cat dog bird tree river city house road car red green blue one two three".split()


@pytest.fixture(scope="module")
def server(tiny_ckpts, tmp_path_factory):
    sp = start_server(
        [
            "--reward-model",
            str(tiny_ckpts.reward),
            "--reference-model",
            str(tiny_ckpts.reference),
            "--max-wait-ms",
            "5",
        ],
        tmp_path_factory.mktemp("dpo-srv"),
        env=SERVER_ENV,
    )
    yield sp
    sp.stop()


def toy_preferences(path: Path, n: int = 16, seed: int = 0) -> Path:
    """A separable set: the chosen response is made of 'good' words, the rejected of 'bad'."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
        k = rng.randint(1, 3)
        rows.append({"prompt": prompt, "chosen": " good" * k, "rejected": " bad" * k})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_config(tmp: Path, policy: Path, address: str, run_dir: Path, **sections) -> Path:
    cfg: dict[str, dict] = {
        "model": {"policy": str(policy)},
        "data": {"preferences": str(toy_preferences(tmp / "prefs.jsonl"))},
        "server": {"address": address, "timeout": 10.0, "wait_ready_seconds": 5.0},
        "dpo": {"beta": 0.1, "batch_size": 8, "micro_batch_size": 4, "lr": 3e-3, "epochs": 3},
        "run": {"output_dir": str(run_dir), "seed": 0, "progress": False, "num_threads": 1},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path = tmp / f"dpo-{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_dpo_learns_the_preferences(server, tiny_ckpts, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    cfg = write_config(tmp_path, tiny_ckpts.reference, server.address, run)
    assert main(["dpo", "--config", str(cfg)]) == 0, capsys.readouterr().err
    rows = read_metrics(run / "metrics.jsonl")
    first, steps, last = rows[0], rows[1:], rows[-1]
    assert first["step"] == 0 and [r["step"] for r in steps] == list(range(1, 7))  # 16 pairs / 8
    for r in steps:
        assert set(TRL_KEYS) <= set(r) and {"grad_norm", "learning_rate", "epoch"} <= set(r)
    # policy == reference at the start: every implicit reward is 0, the loss is ln 2
    assert first["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    assert first["eval_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert first["eval_rewards/accuracies"] == 0.0
    # ... and at the end the policy's implicit reward ranks (nearly) every pair right
    assert last["eval_rewards/accuracies"] >= 0.9
    assert last["eval_rewards/margins"] > 0.1
    assert last["eval_loss"] < first["eval_loss"] - 0.05
    assert np.mean([r["rewards/accuracies"] for r in steps[-2:]]) > steps[0]["rewards/accuracies"]
    assert (run / "curves.png").stat().st_size > 0
    assert (run / CACHE_NAME).is_file()
    assert (run / "checkpoints" / "iter_000006" / "policy").is_dir()


def test_server_logprobs_equal_an_inprocess_reference(server, tiny_ckpts, tmp_path: Path):
    """The cached ReferenceLogProbs equal a plain forward of the reference checkpoint within
    1e-5, and the trainer's own (padded) forward of the untrained policy matches them."""
    cfg = load_dpo_config(
        write_config(tmp_path, tiny_ckpts.reference, server.address, tmp_path / "ref")
    )
    trainer = DPOTrainer(cfg)
    try:
        arrays, info = trainer.reference_logprobs()
        ids, starts = pair_sequences(trainer.pairs)
        expected = inprocess_logprobs(str(tiny_ckpts.reference), ids, starts, 1.0)
        assert len(arrays) == len(expected) == 2 * len(trainer.pairs)
        for got, want in zip(arrays, expected, strict=True):
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        assert info["fingerprint"] == trainer.fingerprint
        with torch.no_grad():
            chosen, rejected, _ = trainer.sequence_logps(list(range(len(trainer.pairs))))
        n = len(trainer.pairs)
        sums = np.array([a.sum() for a in arrays])
        np.testing.assert_allclose(chosen.numpy(), sums[:n], atol=1e-4)
        np.testing.assert_allclose(rejected.numpy(), sums[n:], atol=1e-4)
    finally:
        trainer.close()


def test_wrong_tokenizer_is_refused_before_training(server, tmp_path: Path, capsys) -> None:
    from reward_server.tiny import build_tiny_checkpoints

    other = build_tiny_checkpoints(tmp_path / "other", vocab_size=300, seed=1)
    run = tmp_path / "run"
    cfg = write_config(tmp_path, other.reference, server.address, run)
    assert main(["dpo", "--config", str(cfg)]) == 3
    err = capsys.readouterr().err
    assert "another vocabulary" in err and "fingerprint" in err
    assert not (run / "checkpoints").exists() and not (run / CACHE_NAME).exists()
    assert read_metrics(run / "metrics.jsonl") == []


def _comparable(m: dict) -> dict:
    return {k: v for k, v in m.items() if k not in WALL_CLOCK_KEYS | {"step_seconds"}}


@pytest.mark.parametrize("loss", ["ipo", "cdpo"])
def test_resume_is_exact_and_never_refetches(server, tiny_ckpts, tmp_path: Path, loss) -> None:
    dpo = {"epochs": 2}
    dpo.update({"loss_type": "ipo"} if loss == "ipo" else {"label_smoothing": 0.1})
    full = write_config(tmp_path, tiny_ckpts.reference, server.address, tmp_path / "full", dpo=dpo)
    assert main(["dpo", "--config", str(full)]) == 0
    split_dir = tmp_path / "split"
    split = write_config(tmp_path, tiny_ckpts.reference, server.address, split_dir, dpo=dpo)
    assert main(["dpo", "--config", str(split), "--run.stop-after", "2"]) == 0
    cache = (split_dir / CACHE_NAME).read_bytes()
    # nothing listens there: the resumed run (epoch 2 included) reads the cache only
    dead = f"127.0.0.1:{free_port()}"
    assert main(["dpo", "--config", str(split), "--resume", "--server", dead]) == 0
    assert (split_dir / CACHE_NAME).read_bytes() == cache
    a, b = (
        read_metrics(tmp_path / "full" / "metrics.jsonl"),
        read_metrics(split_dir / "metrics.jsonl"),
    )
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(5))
    for x, y in zip(a, b, strict=True):
        x, y = _comparable(x), _comparable(y)
        assert x.keys() == y.keys()
        for k in x:
            assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-6), (x["step"], k)
