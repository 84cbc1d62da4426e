"""Runs that repeat bit for bit against a `--batch-invariant` server: two `policy-trainer ppo`
runs with the same config and seed write the same metrics.jsonl (every number but the wall-clock
ones, compared exactly), for PPO with GAE and for GRPO; a run SIGKILLed mid-way and resumed with
`--resume` writes the same metrics and ends with the same weights as the uninterrupted run."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from policy_trainer.cli import main
from policy_trainer.run_logging import WALL_CLOCK_KEYS, read_metrics
from tests.conftest import REPO, start_server
from tests.integration.test_trainer_cli import (  # noqa: F401 - fixture
    SERVER_ENV,
    _restore_torch_threads,
    cli_env,
    write_config,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tiny_ckpts, tmp_path_factory):
    sp = start_server(
        [
            "--batch-invariant",
            "--reward-model", str(tiny_ckpts.reward),
            "--reference-model", str(tiny_ckpts.reference),
            "--max-wait-ms", "5",
        ],
        tmp_path_factory.mktemp("invariant-srv"),
        env=SERVER_ENV,
    )  # fmt: skip
    yield sp
    sp.stop()


def comparable(path: Path) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in WALL_CLOCK_KEYS} for m in read_metrics(path)]


def weights_digest(run_dir: Path, iteration: int) -> str:
    from safetensors import safe_open

    h = hashlib.sha256()
    ckpt = run_dir / "checkpoints" / f"iter_{iteration:06d}" / "policy"
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in sorted(st.keys()):
                h.update(k.encode())
                h.update(st.get_tensor(k).numpy().tobytes())
    return h.hexdigest()


SECTIONS = dict(
    ppo={"adaptive_kl": True, "kl_coef": 0.1, "kl_target": 0.01, "lr": 3e-3},
    run={"iterations": 3, "save_every": 1, "seed": 7},
)


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_two_runs_write_identical_metrics(server, tiny_ckpts, tmp_path: Path, estimator: str):
    ppo = {**SECTIONS["ppo"], "advantage_estimator": estimator}
    runs = []
    for name in ("a", "b"):
        cfg = write_config(
            tmp_path / f"{name}.yaml", tiny_ckpts, server.address, tmp_path / name,
            ppo=ppo, run=SECTIONS["run"],
        )  # fmt: skip
        assert main(["ppo", "--config", str(cfg)]) == 0
        runs.append(comparable(tmp_path / name / "metrics.jsonl"))
    assert [m["iteration"] for m in runs[0]] == [1, 2, 3]
    assert runs[0] == runs[1]  # every number, exactly
    assert weights_digest(tmp_path / "a", 3) == weights_digest(tmp_path / "b", 3)
    assert runs[0][2]["kl_mean"] != runs[0][0]["kl_mean"]  # the policy moved: a real comparison


def test_sigkilled_run_resumes_to_the_same_run(server, tiny_ckpts, tmp_path: Path):
    run = {**SECTIONS["run"], "iterations": 4}
    full_cfg = write_config(
        tmp_path / "full.yaml", tiny_ckpts, server.address, tmp_path / "full",
        ppo=SECTIONS["ppo"], run=run,
    )  # fmt: skip
    assert main(["ppo", "--config", str(full_cfg)]) == 0

    killed_dir = tmp_path / "killed"
    cfg = write_config(
        tmp_path / "killed.yaml", tiny_ckpts, server.address, killed_dir,
        ppo=SECTIONS["ppo"], run=run,
    )  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "policy_trainer.cli", "ppo", "--config", str(cfg)],
        cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    try:
        while not (killed_dir / "checkpoints" / "iter_000002").is_dir():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # mid-way: during iteration 3 (or its checkpoint)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert main(["ppo", "--config", str(cfg), "--resume"]) == 0
    assert comparable(killed_dir / "metrics.jsonl") == comparable(
        tmp_path / "full" / "metrics.jsonl"
    )
    assert weights_digest(killed_dir, 4) == weights_digest(tmp_path / "full", 4)
