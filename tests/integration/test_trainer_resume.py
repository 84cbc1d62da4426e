"""A run stopped after iteration k and resumed gives the same metrics for k+1.. as an
uninterrupted run with the same seed."""

from __future__ import annotations

from pathlib import Path

import pytest

from policy_trainer.cli import main
from policy_trainer.run_logging import WALL_CLOCK_KEYS, read_metrics
from tests.conftest import start_server
from tests.integration.test_trainer_cli import (  # noqa: F401 - fixture
    SERVER_ENV,
    _restore_torch_threads,
    write_config,
)

pytestmark = pytest.mark.integration


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
        tmp_path_factory.mktemp("resume-srv"),
        env=SERVER_ENV,
    )
    yield sp
    sp.stop()


def comparable(m: dict) -> dict:
    return {k: v for k, v in m.items() if k not in WALL_CLOCK_KEYS}


def assert_same_metrics(a: dict, b: dict) -> None:
    a, b = comparable(a), comparable(b)
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], float):
            # the server batches dynamically, so its float32 sums may differ in the last bits
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["iteration"], k, a[k], b[k])
        else:
            assert a[k] == b[k], (a["iteration"], k)


def test_resume_matches_uninterrupted_run(server, tiny_ckpts, tmp_path: Path) -> None:
    sections = dict(
        ppo={"adaptive_kl": True, "kl_coef": 0.1, "kl_target": 0.01, "kl_horizon": 100, "lr": 3e-3},
        run={"iterations": 4, "save_every": 1, "seed": 123},
    )
    full_dir, split_dir = tmp_path / "full", tmp_path / "split"
    full_cfg = write_config(
        tmp_path / "full.yaml", tiny_ckpts, server.address, full_dir, **sections
    )
    split_cfg = write_config(
        tmp_path / "split.yaml", tiny_ckpts, server.address, split_dir, **sections
    )

    assert main(["ppo", "--config", str(full_cfg)]) == 0
    # --resume-if-present starts a fresh run when there is no checkpoint (a Job's first attempt)
    # and resumes when there is one (its retry)
    cmd = ["ppo", "--config", str(split_cfg), "--resume-if-present"]
    assert main([*cmd, "run.stop_after=2"]) == 0
    first_half = read_metrics(split_dir / "metrics.jsonl")
    assert [m["iteration"] for m in first_half] == [1, 2]
    assert main(cmd) == 0

    full = read_metrics(full_dir / "metrics.jsonl")
    split = read_metrics(split_dir / "metrics.jsonl")
    assert [m["iteration"] for m in full] == [1, 2, 3, 4]
    assert [m["iteration"] for m in split] == [1, 2, 3, 4]
    for a, b in zip(full, split, strict=True):
        assert_same_metrics(a, b)
    # the run learned and the controller moved, so the comparison covers changing state
    assert full[3]["beta"] != full[0]["beta"]
    assert full[3]["lr"] < full[0]["lr"]
    assert full[2]["sample_completion"] == split[2]["sample_completion"]
    # a retry of a finished run changes nothing and succeeds
    assert main(cmd) == 0
    assert read_metrics(split_dir / "metrics.jsonl") == split


def test_resume_without_checkpoint_is_a_clear_error(tiny_ckpts, tmp_path: Path, capsys) -> None:
    cfg = write_config(tmp_path / "c.yaml", tiny_ckpts, "127.0.0.1:1", tmp_path / "empty")
    assert main(["ppo", "--config", str(cfg), "--resume"]) == 2
    assert "--resume: no checkpoint under" in capsys.readouterr().err
