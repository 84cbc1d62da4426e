"""Low-load latency: one client sending one item of a fixed length, against the in-process time of
the same work (tokenise + forward of one item).

    python -m bench latency --kind gpt2-small --length 64 --max-wait-ms 5

Target (issue 7): server p50 <= in-process time + max_wait_ms + 3 ms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from bench import machine
from bench.loadgen import build_requests, load
from bench.models import DEFAULT_DIR, build
from bench.servers import start_reward_server
from bench.workload import LengthDist, RequestShape, make_pairs
from reward_server.models.reward import ScoreInput


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", default="gpt2-small")
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--server-arg", action="append", default=[], help="extra `serve` flag")
    p.add_argument("--models-dir", type=Path, default=DEFAULT_DIR)
    p.add_argument("--out", type=Path, default=Path("runs/bench"))


def inprocess_ms(runner, pairs, n: int = 30) -> float:
    """Median ms to tokenise and forward one item."""
    times = []
    for i in range(n):
        p, c = pairs[i % len(pairs)]
        t0 = time.perf_counter()
        runner.forward(runner.encode([ScoreInput(p, c)], "right"))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def run(a: argparse.Namespace) -> dict:
    import torch

    from reward_server.models.reward import RewardRunner

    model = str(build(a.kind, "reward", a.models_dir))
    runner = RewardRunner("rm", model, device="cpu", dtype=torch.float32)
    pairs, _ = make_pairs(200, LengthDist(a.length, a.length), 0, runner.tokenizer)
    requests = build_requests(pairs, RequestShape(1, 1), 200, 0, model="rm")
    args = ["--reward-model", f"rm={model}", "--max-wait-ms", str(a.max_wait_ms), *a.server_arg]
    sp = start_reward_server("latency", args, a.out / "logs")
    rows = []
    try:
        runner.forward(runner.encode([ScoreInput(*pairs[0])], "right"))
        for rep in range(a.repeats):
            meter = machine.LoadMeter([sp.proc.pid])
            res = load(sp.address, requests, clients=1, duration=a.duration, warmup=1.0)
            load_s = meter.stop().summary()
            ip = inprocess_ms(runner, pairs)
            rows.append(
                {
                    "repeat": rep,
                    "server_p50_ms": res.latency_ms(50),
                    "server_p99_ms": res.latency_ms(99),
                    "inprocess_ms": ip,
                    "bound_ms": ip + a.max_wait_ms + 3.0,
                    "met": res.latency_ms(50) <= ip + a.max_wait_ms + 3.0,
                    "load": load_s,
                }
            )
            print(json.dumps(rows[-1]))
    finally:
        sp.stop()
    out = {
        "config": {k: str(v) for k, v in vars(a).items() if k != "func"},
        "rows": rows,
        "machine": machine.describe(),
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"latency-{a.kind}-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(
        json.dumps(out, indent=1)
    )
    return out
