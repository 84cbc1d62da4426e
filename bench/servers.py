"""Server processes for benchmarks (the real server, its arrival-order variant, the naive
baseline), their readiness, Prometheus metrics and CPU use."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class BenchServer:
    """A server subprocess on loopback."""

    label: str
    proc: subprocess.Popen
    port: int
    metrics_port: int
    log_path: Path
    cmd: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process and its threads so far."""
        import psutil

        t = psutil.Process(self.proc.pid).cpu_times()
        return t.user + t.system

    def metrics(self) -> dict[str, float]:
        """Prometheus samples as {'name{labels}': value} (empty without a metrics port)."""
        if not self.metrics_port:
            return {}
        from prometheus_client.parser import text_string_to_metric_families

        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}"] = s.value
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _wait_serving(sp: BenchServer, timeout: float) -> None:
    end = time.monotonic() + timeout
    with grpc.insecure_channel(sp.address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            if sp.proc.poll() is not None:
                raise RuntimeError(
                    f"{sp.label} exited with {sp.proc.returncode}:\n{sp.log_path.read_text()}"
                )
            try:
                st = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                if st == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > end:
                sp.stop()
                raise RuntimeError(f"{sp.label} not SERVING after {timeout}s")
            time.sleep(0.2)


def _launch(
    label: str, cmd: list[str], port: int, mport: int, log_dir: Path, env: dict
) -> BenchServer:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{label}-{port}.log"
    fh = open(log_path, "w")  # noqa: SIM115 - lives as long as the process
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **env}
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=full_env)
    return BenchServer(label, proc, port, mport, log_path, cmd)


def start_reward_server(
    label: str,
    serve_args: list[str],
    log_dir: Path,
    *,
    variant: str = "",
    env: dict | None = None,
    timeout: float = 300.0,
) -> BenchServer:
    """`reward-server serve` (or `bench.serve_variant` when variant == "arrival") on loopback."""
    port, mport = free_port(), free_port()
    module = "bench.serve_variant" if variant else "reward_server.cli"
    env = {**(env or {}), **({"BENCH_BATCH_VARIANT": variant} if variant else {})}
    cmd = [
        sys.executable,
        "-m",
        module,
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        str(mport),
        "--device",
        "cpu",
        "--log-level",
        "INFO",
        *serve_args,
    ]
    sp = _launch(label, cmd, port, mport, log_dir, env)
    _wait_serving(sp, timeout)
    return sp


def start_naive_server(
    label: str,
    model: str,
    log_dir: Path,
    *,
    backend: str = "torch",
    env: dict | None = None,
    workers: int = 1,
    threads: int = 0,
) -> BenchServer:
    """The naive one-forward-per-request baseline (bench/naive_server.py)."""
    port, mport = free_port(), free_port()
    cmd = [sys.executable, "-m", "bench.naive_server", "--model", model, "--port", str(port)]
    cmd += ["--backend", backend, "--metrics-port", str(mport)]
    cmd += ["--workers", str(workers), "--threads", str(threads)]
    sp = _launch(label, cmd, port, mport, log_dir, env or {})
    _wait_serving(sp, 300.0)
    return sp


def metric_delta(
    before: dict[str, float], after: dict[str, float], model: str, seconds: float = 0.0
) -> dict:
    """The server's own view of a window: mean batch size, padding efficiency, mean times, and
    (with the window's length) the real tokens its forwards completed per second, which stays
    exact when requests take longer than the window."""

    def d(name: str) -> float:
        key = f'{name}{{model="{model}"}}'
        return after.get(key, 0.0) - before.get(key, 0.0)

    batches = d("reward_server_batch_size_count")
    items = d("reward_server_batch_size_sum")
    real, padded = d("reward_server_real_tokens_total"), d("reward_server_padded_tokens_total")
    queued = d("reward_server_queue_seconds_count")
    toks = d("reward_server_tokenize_seconds_count")
    return {
        "forwarded_tokens_per_s": real / seconds if seconds else float("nan"),
        "batches": batches,
        "mean_batch_items": items / batches if batches else float("nan"),
        "mean_batch_padded_tokens": padded / batches if batches else float("nan"),
        "padding_efficiency": real / padded if padded else float("nan"),
        "mean_queue_ms": 1e3 * d("reward_server_queue_seconds_sum") / queued
        if queued
        else float("nan"),
        "mean_forward_ms": 1e3 * d("reward_server_inference_seconds_sum") / batches
        if batches
        else float("nan"),
        "forward_busy_s": d("reward_server_inference_seconds_sum"),
        "mean_tokenize_ms": 1e3 * d("reward_server_tokenize_seconds_sum") / toks
        if toks
        else float("nan"),
    }
