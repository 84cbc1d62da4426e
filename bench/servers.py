"""Server processes for benchmarks (the real server, its arrival-order variant, the naive
baseline) on loopback, launched and awaited by reward_server/local_server.py, and the
Prometheus deltas of a measured window."""

from __future__ import annotations

import sys
from pathlib import Path

from reward_server.local_server import LocalServer, free_port, launch, start_local_server

REPO = Path(__file__).resolve().parents[1]
BENCH_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
STOP_SECONDS = 30.0
"""Grace after SIGTERM before SIGKILL (a loaded server drains its queue first)."""


def start_reward_server(
    label: str,
    serve_args: list[str],
    log_dir: Path,
    *,
    variant: str = "",
    env: dict | None = None,
    timeout: float = 300.0,
) -> LocalServer:
    """`reward-server serve` (or `bench.serve_variant` when variant == "arrival") on loopback."""
    module = "bench.serve_variant" if variant else "reward_server.cli"
    env = {**BENCH_ENV, **(env or {}), **({"BENCH_BATCH_VARIANT": variant} if variant else {})}
    return start_local_server(
        ["--log-level", "INFO", *serve_args],
        log_dir,
        program=[sys.executable, "-m", module],
        label=label,
        metrics=True,
        env=env,
        cwd=REPO,
        timeout=timeout,
        stop_timeout=STOP_SECONDS,
    )


def start_naive_server(
    label: str,
    model: str,
    log_dir: Path,
    *,
    backend: str = "torch",
    env: dict | None = None,
    workers: int = 1,
    threads: int = 0,
    device: str = "cpu",
) -> LocalServer:
    """The naive one-forward-per-request baseline (bench/naive_server.py)."""
    port, mport = free_port(), free_port()
    cmd = [sys.executable, "-m", "bench.naive_server", "--model", model, "--port", str(port)]
    cmd += ["--backend", backend, "--metrics-port", str(mport)]
    cmd += ["--workers", str(workers), "--threads", str(threads), "--device", device]
    server = launch(
        cmd,
        port,
        Path(log_dir) / f"{label}-{port}.log",
        metrics_port=mport,
        label=label,
        env={**BENCH_ENV, **(env or {})},
        cwd=REPO,
        stop_timeout=STOP_SECONDS,
    )
    server.wait_serving(300.0)
    return server


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
