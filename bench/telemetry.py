"""What the reward-hacking telemetry costs the Score path, in process: the servicer's per-request
telemetry step (the window append and the score histogram's buckets, `RewardServicer._observe`)
per item, side by side with the step it sits next to on the same path (building the
ScoreResponse, `serve.convert.score_response`), and the cost of computing the figures (a
GetStats or a Prometheus scrape) over full windows. Times are the thread's CPU time.

    python -m bench telemetry --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

from bench import machine
from reward_server.engine.engine import Timing
from reward_server.score_result import ScoreResult
from reward_server.serve import convert
from reward_server.serve.metrics import ServerMetrics
from reward_server.serve.telemetry import Telemetry


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repeats", type=int, default=5, help="repeats of every measurement")
    p.add_argument("--items", default="1,8,64", help="items per request")
    p.add_argument("--requests", type=int, default=4000, help="requests per measurement")
    p.add_argument("--window", type=int, default=1000, help="telemetry_window_items")
    p.add_argument("--output", default="runs/bench/telemetry.json")


def _results(n: int, members: tuple[str, ...], rng: random.Random) -> list[ScoreResult]:
    return [
        ScoreResult(
            score=rng.gauss(0, 1),
            head_scores={m: rng.gauss(0, 1) for m in members} if members else {"rm": 0.0},
            num_tokens=rng.randint(16, 512),
            truncated=False,
        )
        for _ in range(n)
    ]


def _per_item_us(fn, batches: list[list[ScoreResult]]) -> float:
    """CPU microseconds per item of this thread (`time.thread_time`: on a shared machine the
    wall clock also counts the time other processes hold the core)."""
    t0 = time.thread_time()
    for b in batches:
        fn(b)
    return (time.thread_time() - t0) / sum(len(b) for b in batches) * 1e6


def run(args: argparse.Namespace) -> None:
    rng = random.Random(0)
    rows = []
    meter = machine.LoadMeter([os.getpid()])
    for k in [int(x) for x in args.items.split(",")]:
        for members in ((), ("helpful", "safe")):
            batches = [_results(k, members, rng) for _ in range(max(1, args.requests // k))]
            tele_us, conv_us = [], []
            for _ in range(args.repeats):
                tel = Telemetry(args.window, 0.0, 16)
                ServerMetrics().add_telemetry(tel)
                tenants = [f"t{i}" for i in range(4)]

                def observe(b: list[ScoreResult], tel=tel, members=members, tenants=tenants):
                    # what RewardServicer._observe does per answered request
                    tel.observe("rm", tenants[len(b) % 4], b, members)

                def response(b: list[ScoreResult]) -> None:
                    convert.score_response("rm", b, Timing(), "rid")

                # interleaved, so both see the same machine load
                tele_us.append(_per_item_us(observe, batches))
                conv_us.append(_per_item_us(response, batches))
            rows.append(
                {
                    "items_per_request": k,
                    "members": len(members),
                    "telemetry_us_per_item": statistics.median(tele_us),
                    "score_response_us_per_item": statistics.median(conv_us),
                    "telemetry_share_of_score_response": statistics.median(
                        t / c for t, c in zip(tele_us, conv_us, strict=True)
                    ),
                    "repeats_telemetry_us": tele_us,
                    "repeats_score_response_us": conv_us,
                }
            )
            print(
                f"{k:3d} items/request, {len(members)} members: telemetry "
                f"{rows[-1]['telemetry_us_per_item']:.2f} us/item, ScoreResponse building "
                f"{rows[-1]['score_response_us_per_item']:.2f} us/item",
                flush=True,
            )
    # the figures, computed at GetStats / scrape time: 4 tenants x 2 models with full windows
    tel = Telemetry(args.window, 0.0, 16)
    for t in range(4):
        tel.observe("rm", f"t{t}", _results(args.window, (), rng), ())
        tel.observe("both", f"t{t}", _results(args.window, ("a", "b"), rng), ("a", "b"))
    stats_ms = []
    for _ in range(args.repeats):
        t0 = time.thread_time()
        tel.stats()
        stats_ms.append((time.thread_time() - t0) * 1e3)
    out = {
        "rows": rows,
        "stats_8_full_windows_ms": statistics.median(stats_ms),
        "stats_repeats_ms": stats_ms,
        "window_items": args.window,
        "machine": machine.describe(),
        "load": meter.stop().summary(),
    }
    print(
        f"figures of 8 full windows of {args.window} items: "
        f"{out['stats_8_full_windows_ms']:.1f} ms; load {out['load']}"
    )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.output}")
