"""A server process on loopback, for tests, benchmarks and the demo.

Picks a free port, starts the command with its output in a log file, waits until the standard
gRPC health service (grpc.health.v1) says SERVING, failing with the log when the process exits
first or the wait times out, and stops it with SIGTERM, then SIGKILL after a grace period.

No torch here: the server runs in its own process, and only `reward_server.client` is used, to
poll its health. Any process that serves grpc.health.v1 works (bench/naive_server.py does).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SERVE_PROGRAM: tuple[str, ...] = (sys.executable, "-m", "reward_server.cli")
"""`reward-server` run by this interpreter (works without the console script on PATH)."""
LOOPBACK = "127.0.0.1"


class ServerStartError(RuntimeError):
    """The server process exited, or did not report SERVING in time; the message holds its log."""


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on `host` now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def scrape_metrics(port: int, host: str = LOOPBACK, timeout: float = 10.0) -> dict[str, float]:
    """Prometheus samples of http://HOST:PORT/metrics as {'name{label="v",...}': value}
    (parsed with prometheus_client, of the server extra)."""
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://{host}:{port}/metrics"
    text = urllib.request.urlopen(url, timeout=timeout).read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


@dataclass
class LocalServer:
    """A server subprocess listening on a loopback port, its output going to `log_path`."""

    proc: subprocess.Popen
    port: int
    log_path: Path
    metrics_port: int = 0
    """Prometheus port, 0 when metrics are off."""
    label: str = "server"
    """Name used in error messages and in the log file name."""
    cmd: list[str] = field(default_factory=list)
    """The command line that started the process."""
    stop_timeout: float = 20.0
    """Seconds `stop()` waits after SIGTERM before SIGKILL."""
    host: str = LOOPBACK

    @property
    def address(self) -> str:
        """host:port for a client."""
        return f"{self.host}:{self.port}"

    def log(self) -> str:
        """Everything the process wrote so far (stdout and stderr)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def metrics(self) -> dict[str, float]:
        """Prometheus samples (see `scrape_metrics`); empty without a metrics port."""
        return scrape_metrics(self.metrics_port, self.host) if self.metrics_port else {}

    def wait_serving(
        self, timeout: float, *, poll: float = 0.1, client_kwargs: dict[str, Any] | None = None
    ) -> None:
        """Poll the health service until SERVING. `client_kwargs` go to `RewardClient` (TLS,
        token). Raises ServerStartError with the log when the process exits first; stops the
        process and raises it when `timeout` seconds pass."""
        from reward_server.client import RewardClient

        end = time.monotonic() + timeout
        with RewardClient(self.address, **(client_kwargs or {})) as client:
            while True:
                if self.proc.poll() is not None:
                    raise ServerStartError(
                        f"{self.label} exited with {self.proc.returncode}:\n{self.log()}"
                    )
                if client.health(timeout=max(0.1, min(5.0, end - time.monotonic()))) == "SERVING":
                    return
                if time.monotonic() > end:
                    self.stop()
                    raise ServerStartError(
                        f"{self.label} not SERVING after {timeout}s:\n{self.log()}"
                    )
                time.sleep(poll)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM (the server drains) and wait up to `timeout` seconds; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if still running after `stop_timeout` seconds."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def launch(
    cmd: Sequence[str],
    port: int,
    log_path: Path,
    *,
    metrics_port: int = 0,
    label: str = "server",
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    stop_timeout: float = 20.0,
) -> LocalServer:
    """Start `cmd` (which serves on `port`) with stdout and stderr in `log_path`; no waiting.
    `env` is added to this process's environment."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as fh:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            list(cmd),
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env={**os.environ, **(env or {})},
        )
    return LocalServer(proc, port, log_path, metrics_port, label, list(cmd), stop_timeout)


def serve_command(
    args: Sequence[str],
    port: int,
    *,
    program: Sequence[str] = SERVE_PROGRAM,
    host: str = LOOPBACK,
    device: str = "cpu",
    metrics_port: int = 0,
) -> list[str]:
    """`PROGRAM serve --host HOST --port PORT [--metrics-port M] --device DEVICE ARGS` (a flag
    repeated in ARGS wins: the last occurrence counts)."""
    cmd = [*program, "serve", "--host", host, "--port", str(port)]
    if metrics_port:
        cmd += ["--metrics-port", str(metrics_port)]
    return [*cmd, "--device", device, *args]


def start_local_server(
    args: Sequence[str],
    log_dir: str | Path,
    *,
    program: Sequence[str] = SERVE_PROGRAM,
    label: str = "server",
    log_name: str | None = None,
    device: str = "cpu",
    metrics: bool = False,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    wait: bool = True,
    timeout: float = 90.0,
    client_kwargs: dict[str, Any] | None = None,
    stop_timeout: float = 20.0,
) -> LocalServer:
    """Run `reward-server serve ARGS` on a free loopback port (and a free metrics port with
    `metrics`), logging to LOG_DIR/`log_name` (default LABEL-PORT.log); with `wait`, return once
    it is SERVING (see `LocalServer.wait_serving`). A port taken between `free_port` and the
    server's bind (another process on a shared machine) is retried on new ports, twice."""
    for attempt in range(3):
        port = free_port()
        metrics_port = free_port() if metrics else 0
        cmd = serve_command(args, port, program=program, device=device, metrics_port=metrics_port)
        log_path = Path(log_dir) / (log_name or f"{label}-{port}.log")
        server = launch(
            cmd,
            port,
            log_path,
            metrics_port=metrics_port,
            label=label,
            env=env,
            cwd=cwd,
            stop_timeout=stop_timeout,
        )
        if not wait:
            return server
        try:
            server.wait_serving(timeout, client_kwargs=client_kwargs)
            return server
        except ServerStartError as exc:
            if attempt == 2 or "Address already in use" not in str(exc):
                raise
    raise AssertionError("unreachable")
