"""Run outputs: metrics.jsonl lines, truncation on resume, curves.png, TensorBoard."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from policy_trainer.config import ConfigError
from policy_trainer.run_logging import RunLogger, read_metrics


def _m(i: int, reward: float) -> dict:
    return {"iteration": i, "reward_mean": reward, "kl_mean": 0.1 * i, "beta": 0.05}


def test_metrics_lines_plot_and_resume_truncation(tmp_path: Path) -> None:
    log = RunLogger(tmp_path, enabled=True, tensorboard=False, resume_after=None)
    for i in range(1, 5):
        log.log(_m(i, float("nan") if i == 2 else float(i)))
    log.plot()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["iteration"] for x in lines] == [1, 2, 3, 4]
    assert json.loads(lines[1])["reward_mean"] is None  # NaN is written as null (valid JSON)
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # resuming from a checkpoint of iteration 2 drops the lines written after it
    log2 = RunLogger(tmp_path, enabled=True, tensorboard=False, resume_after=2)
    assert [m["iteration"] for m in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    log2.log(_m(3, 9.0))
    assert [m["reward_mean"] for m in read_metrics(tmp_path / "metrics.jsonl")] == [1.0, None, 9.0]
    # a fresh (non-resumed) run starts an empty file; other ranks write nothing
    RunLogger(tmp_path, enabled=True, tensorboard=False, resume_after=None)
    assert read_metrics(tmp_path / "metrics.jsonl") == []
    other = RunLogger(tmp_path / "rank1", enabled=False, tensorboard=False, resume_after=None)
    other.log(_m(1, 1.0))
    other.plot()
    assert not (tmp_path / "rank1").exists()


def test_tensorboard_is_optional_with_a_clear_error(tmp_path: Path) -> None:
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ConfigError, match="tensorboard package is not installed"):
            RunLogger(tmp_path, enabled=True, tensorboard=True, resume_after=None)
    else:
        log = RunLogger(tmp_path, enabled=True, tensorboard=True, resume_after=None)
        log.log(_m(1, 1.0))
        log.close()
        assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
