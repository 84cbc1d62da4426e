"""In-process throughput against the padded-token budget (and batch 1), to choose the device's
default `max_batch_tokens` by measurement.

    python -m bench budget --kind gpt2-small --budgets 512,1024,2048,4096,8192 --items 96

Budgets are measured in a rotating order, `--repeats` times, on the same items.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from tqdm import tqdm

from bench import machine
from bench.inprocess import run_inprocess
from bench.models import DEFAULT_DIR, build
from bench.workload import LengthDist, make_pairs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", default="gpt2-small")
    p.add_argument("--budgets", default="512,1024,2048,4096,8192")
    p.add_argument("--items", type=int, default=96)
    p.add_argument("--lengths", default="16..256")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch1", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--max-items", type=int, default=64, help="item cap per forward")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (bfloat16 on CUDA)")
    p.add_argument("--models-dir", type=Path, default=DEFAULT_DIR)
    p.add_argument("--out", type=Path, default=Path("runs/bench"))


def run(a: argparse.Namespace) -> dict:
    import os

    import torch

    from reward_server.devices import resolve_dtype
    from reward_server.models.reward import RewardRunner

    model = str(build(a.kind, "reward", a.models_dir))
    dtype = torch.float32 if a.device == "cpu" else resolve_dtype("auto", a.device)
    runner = RewardRunner("rm", model, device=a.device, dtype=dtype)
    pairs, _ = make_pairs(a.items, LengthDist.parse(a.lengths), 0, runner.tokenizer)
    budgets = [int(b) for b in a.budgets.split(",")]
    points = [(b, a.max_items) for b in budgets] + ([(max(budgets), 1)] if a.batch1 else [])
    runner.forward(runner.warmup_items(max(budgets), a.max_items))
    rows = []
    bar = tqdm(total=a.repeats * len(points), desc=f"budget {a.kind}")
    for rep in range(a.repeats):
        k = rep % len(points)
        for budget, cap in points[k:] + points[:k]:
            meter = machine.LoadMeter([os.getpid()])
            r = run_inprocess(runner, pairs, max_tokens=budget, max_items=cap)
            rows.append(
                {
                    "repeat": rep,
                    "budget": budget,
                    "max_items": cap,
                    "tokens_per_s": round(r.tokens_per_s, 1),
                    "padding_efficiency": round(r.padding_efficiency, 4),
                    "batches": r.batches,
                    "load": meter.stop().summary(),
                }
            )
            bar.update(1)
    bar.close()
    summary = {}
    for budget, cap in points:
        vals = [r["tokens_per_s"] for r in rows if r["budget"] == budget and r["max_items"] == cap]
        summary["batch 1" if cap == 1 else str(budget)] = statistics.median(vals)
    for budget, cap in points:
        effs = [
            r["padding_efficiency"] for r in rows if r["budget"] == budget and r["max_items"] == cap
        ]
        summary[f"padding efficiency {'batch 1' if cap == 1 else budget}"] = statistics.median(effs)
    out = {
        "config": {k: str(v) for k, v in vars(a).items() if k != "func"},
        "machine": machine.describe(),
        "rows": rows,
        "median_tokens_per_s": summary,
    }
    print(json.dumps(summary, indent=1))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"budget-{a.kind}-{a.device}-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(
        json.dumps(out, indent=1)
    )
    return out
