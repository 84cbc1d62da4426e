"""ONNX Runtime against torch on this machine: the same exported model, the same sorted batches.

    python -m bench onnx --kind gpt2-small --items 64 --repeats 3

Exports the benchmark model once (runs/bench-models/KIND-reward-onnx, with
`reward-server export-onnx`), checks parity on the benchmark items, then times in-process passes of
both backends in alternation. Serving figures come from `python -m bench compare --backend onnx`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench import machine
from bench.inprocess import run_inprocess
from bench.models import DEFAULT_DIR, build
from bench.workload import LengthDist, make_pairs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", default="gpt2-small")
    p.add_argument("--items", type=int, default=64)
    p.add_argument("--lengths", default="16..256")
    p.add_argument("--max-batch-tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models-dir", type=Path, default=DEFAULT_DIR)
    p.add_argument("--out", type=Path, default=Path("runs/bench"))


def exported(kind: str, models_dir: Path) -> Path:
    """The ONNX export of the benchmark reward model (made once with the CLI)."""
    src = build(kind, "reward", models_dir)
    dst = Path(models_dir) / f"{kind}-reward-onnx"
    if not (dst / "onnx_export.json").is_file():
        if dst.exists():
            import shutil

            shutil.rmtree(dst)
        cmd = [sys.executable, "-m", "reward_server.cli", "export-onnx", "--model", str(src)]
        subprocess.run([*cmd, "--output", str(dst)], check=True)
    return dst


def run(a: argparse.Namespace) -> dict:
    import torch

    from reward_server.models.onnx_reward import OnnxRewardRunner
    from reward_server.models.reward import RewardRunner, ScoreInput

    onnx_dir = exported(a.kind, a.models_dir)
    runners = {
        "torch": RewardRunner(
            "rm", str(build(a.kind, "reward", a.models_dir)), device="cpu", dtype=torch.float32
        ),
        "onnx": OnnxRewardRunner("rm", str(onnx_dir), device="cpu"),
    }
    pairs, _ = make_pairs(a.items, LengthDist.parse(a.lengths), 0, runners["torch"].tokenizer)
    enc = runners["torch"].encode([ScoreInput(p, c) for p, c in pairs], "right")
    enc.sort(key=lambda e: len(e.input_ids))
    parity = 0.0
    for i in range(0, len(enc), 8):
        t = np.stack(runners["torch"].forward(enc[i : i + 8]))
        o = np.stack(runners["onnx"].forward(enc[i : i + 8]))
        parity = max(parity, float(np.abs(t - o).max()))
    for r in runners.values():
        r.forward(r.warmup_items(a.max_batch_tokens, 64))
    rows = []
    for rep in range(a.repeats):
        order = ["torch", "onnx"] if rep % 2 == 0 else ["onnx", "torch"]
        for name in order:
            meter = machine.LoadMeter([os.getpid()])
            res = run_inprocess(runners[name], pairs, max_tokens=a.max_batch_tokens, max_items=64)
            rows.append(
                {
                    "repeat": rep,
                    "backend": name,
                    "tokens_per_s": round(res.tokens_per_s, 1),
                    "load": meter.stop().summary(),
                }
            )
            print(json.dumps(rows[-1]))
    ratios = []
    for rep in range(a.repeats):
        x = {r["backend"]: r["tokens_per_s"] for r in rows if r["repeat"] == rep}
        ratios.append(round(x["onnx"] / x["torch"], 3))
    out = {
        "config": {k: str(v) for k, v in vars(a).items() if k != "func"},
        "machine": machine.describe(),
        "parity_max_abs_diff": parity,
        "rows": rows,
        "onnx_over_torch": {"each": ratios, "median": statistics.median(ratios)},
        "providers": runners["onnx"].providers,
    }
    print(json.dumps({"parity": parity, "onnx_over_torch": out["onnx_over_torch"]}))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"onnx-{a.kind}-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(
        json.dumps(out, indent=1)
    )
    return out
