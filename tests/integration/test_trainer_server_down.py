"""The reward server going away mid-run: retried within the budget; if it stays down the trainer
checkpoints the last completed iteration and stops with a clear error."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from policy_trainer.cli import main
from policy_trainer.run_logging import read_metrics
from tests.conftest import REPO, ServerProcess, start_server
from tests.integration.test_trainer_cli import (  # noqa: F401 - fixture
    SERVER_ENV,
    _restore_torch_threads,
    cli_env,
    write_config,
)

pytestmark = pytest.mark.integration


def _server_args(ckpts) -> list[str]:
    return [
        "--reward-model",
        str(ckpts.reward),
        "--reference-model",
        str(ckpts.reference),
        "--max-wait-ms",
        "5",
    ]


def _start_trainer(cfg: Path, address: str, log: Path, *extra: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "policy_trainer.cli",
        "ppo",
        "--config",
        str(cfg),
        "--server",
        address,
        *extra,
    ]
    return subprocess.Popen(
        cmd, cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL, stderr=log.open("w")
    )


def _wait_for_iterations(
    run_dir: Path, n: int, proc: subprocess.Popen, timeout: float = 120
) -> None:
    end = time.monotonic() + timeout
    while len(read_metrics(run_dir / "metrics.jsonl")) < n:
        assert proc.poll() is None, f"trainer exited early with {proc.returncode}"
        assert time.monotonic() < end, "trainer too slow"
        time.sleep(0.05)


def _kill(sp: ServerProcess) -> None:
    sp.proc.send_signal(signal.SIGKILL)
    sp.proc.wait(10)


def test_server_down_for_good_checkpoints_and_stops(tiny_ckpts, tmp_path: Path) -> None:
    sp = start_server(_server_args(tiny_ckpts), tmp_path, env=SERVER_ENV)
    run_dir = tmp_path / "run"
    cfg = write_config(
        tmp_path / "run.yaml", tiny_ckpts, sp.address, run_dir,
        server={"timeout": 2.0, "max_retries": 2, "retry_budget_seconds": 4.0},
        run={"iterations": 200, "save_every": 0},  # no periodic checkpoint: only the failure one
    )  # fmt: skip
    log = tmp_path / "trainer.log"
    proc = _start_trainer(cfg, sp.address, log)
    try:
        _wait_for_iterations(run_dir, 2, proc)
        _kill(sp)
        t_kill = time.monotonic()
        rc = proc.wait(120)
        stopped_after = time.monotonic() - t_kill
    finally:
        if proc.poll() is None:
            proc.kill()
        sp.stop()
    err = log.read_text()
    assert rc == 3, err[-3000:]
    assert "Traceback" not in err
    assert "reward server at" in err and "retry budget" in err
    done = read_metrics(run_dir / "metrics.jsonl")
    k = done[-1]["iteration"]
    assert [m["iteration"] for m in done] == list(range(1, k + 1))
    assert f"checkpoint of iteration {k}" in err
    assert (run_dir / "checkpoints" / f"iter_{k:06d}" / "trainer_state.pt").is_file()
    assert stopped_after < 4.0 + 2.0 * 3 + 15  # budget + one attempt's deadlines + checkpoint time

    # a new server later: --resume continues at k + 1, no completed iteration lost or repeated
    sp2 = start_server(_server_args(tiny_ckpts), tmp_path, env=SERVER_ENV)
    try:
        args = [
            "ppo",
            "--config",
            str(cfg),
            "--server",
            sp2.address,
            "--resume",
            f"run.stop_after={k + 1}",
        ]
        assert main(args) == 0
    finally:
        sp2.stop()
    assert [m["iteration"] for m in read_metrics(run_dir / "metrics.jsonl")] == list(
        range(1, k + 2)
    )


def test_server_restart_within_budget_is_retried(tiny_ckpts, tmp_path: Path) -> None:
    sp = start_server(_server_args(tiny_ckpts), tmp_path, env=SERVER_ENV)
    port = sp.port
    run_dir = tmp_path / "run"
    cfg = write_config(
        tmp_path / "run.yaml", tiny_ckpts, sp.address, run_dir,
        server={"timeout": 5.0, "retry_budget_seconds": 90.0}, run={"iterations": 5, "save_every": 0},
    )  # fmt: skip
    proc = _start_trainer(cfg, sp.address, tmp_path / "trainer.log")
    sp2 = None
    try:
        _wait_for_iterations(run_dir, 2, proc)
        _kill(sp)
        time.sleep(1.0)
        # the same port again (the last --port wins in the server's argument parser)
        sp2 = start_server(
            [*_server_args(tiny_ckpts), "--port", str(port)], tmp_path, wait=False, env=SERVER_ENV
        )
        rc = proc.wait(180)
    finally:
        if proc.poll() is None:
            proc.kill()
        if sp2 is not None:
            sp2.stop()
        sp.stop()
    assert rc == 0, (tmp_path / "trainer.log").read_text()[-3000:]
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert [m["iteration"] for m in metrics] == [1, 2, 3, 4, 5]
    # the iteration that met the outage waited for the server (seconds, not milliseconds)
    assert max(m["rpc_wait_seconds"] for m in metrics[2:]) > 1.0
    assert all(m["valid_fraction"] == 1.0 for m in metrics)
