"""Shared fixtures: tiny checkpoints built once per session, and real server processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
SERVER_BIN = [sys.executable, "-m", "reward_server.cli"]


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    """A `reward-server serve` subprocess on loopback."""

    proc: subprocess.Popen
    port: int
    log_path: Path
    metrics_port: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_server(
    args: list[str],
    tmp_dir: Path,
    *,
    wait: bool = True,
    timeout: float = 90.0,
    metrics: bool = False,
    env: dict[str, str] | None = None,
    ready_kwargs: dict | None = None,
) -> ServerProcess:
    """Run `reward-server serve ARGS` on a free loopback port and wait until SERVING."""
    port = free_port()
    cmd = [
        *SERVER_BIN,
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        *args,
    ]
    mport = 0
    if metrics:
        mport = free_port()
        cmd += ["--metrics-port", str(mport)]
    log_path = Path(tmp_dir) / f"server-{port}.log"
    fh = open(log_path, "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **(env or {})}
    )
    sp = ServerProcess(proc, port, log_path, mport)
    if wait:
        from reward_server.client import RewardClient

        end = time.monotonic() + timeout
        with RewardClient(sp.address, **(ready_kwargs or {})) as c:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode}:\n{sp.log()}")
                if c.health() == "SERVING":
                    break
                if time.monotonic() > end:
                    sp.stop()
                    raise RuntimeError(f"server not SERVING after {timeout}s:\n{sp.log()}")
                time.sleep(0.1)
    return sp


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory: pytest.TempPathFactory):
    """Tiny reward, 2-head reward and reference checkpoints (built once per session)."""
    from reward_server.tiny import build_tiny_checkpoints

    return build_tiny_checkpoints(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_server(tiny_ckpts, tmp_path_factory) -> Iterator[ServerProcess]:
    """One server with the tiny reward (default), the 2-head reward ("rm2") and the reference."""
    sp = start_server(
        [
            "--reward-model",
            str(tiny_ckpts.reward),
            "--reward-model",
            f"rm2={tiny_ckpts.multihead_reward}",
            "--reference-model",
            str(tiny_ckpts.reference),
            "--max-wait-ms",
            "20",
            "--max-items-per-request",
            "64",
        ],
        tmp_path_factory.mktemp("srv"),
        metrics=True,
    )
    yield sp
    sp.stop()
