"""bitsandbytes 8-bit and 4-bit reward models against the unquantized model: rank correlation of
scores on a fixed set, weight memory, and in-process throughput.

    python -m bench quantized --kind small --device cpu        # baseline float32
    python -m bench quantized --kind gpt2-small --device cuda  # baseline bfloat16
    python -m bench quantized --model runs/demo/rm --pairs runs/demo/prefs/prefs_heldout.jsonl

With `--model` and `--pairs` (a preference JSONL: prompt, chosen, rejected) the fixed set is the
pairs' texts, and each row also reports how often the model prefers the chosen side and how often
it agrees with the unquantized model's preference: what quantization costs a trained model.

bitsandbytes >= 0.50 runs its 8-bit and 4-bit layers on CPU too, which is what the CPU run uses.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from bench import machine
from bench.inprocess import run_inprocess
from bench.models import DEFAULT_DIR, build
from bench.workload import LengthDist, make_pairs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", default="small")
    p.add_argument("--model", help="a reward model directory instead of the bench model of --kind")
    p.add_argument("--pairs", type=Path, help="preference JSONL whose texts form the fixed set")
    p.add_argument("--device", default="cpu")
    p.add_argument("--items", type=int, default=256, help="items of the fixed set")
    p.add_argument("--lengths", default="16..256")
    p.add_argument("--max-batch-tokens", type=int, default=2048)
    p.add_argument("--max-batch-items", type=int, default=64)
    p.add_argument("--models-dir", type=Path, default=DEFAULT_DIR)
    p.add_argument("--out", type=Path, default=Path("runs/bench"))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (no ties in continuous scores)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def run(a: argparse.Namespace) -> dict:
    import torch

    from reward_server.models.reward import RewardRunner, ScoreInput

    model = a.model or str(build(a.kind, "reward", a.models_dir))
    prefs = (
        [json.loads(line) for line in a.pairs.read_text().splitlines() if line.strip()][: a.items]
        if a.pairs
        else None
    )
    base_dtype = torch.float32 if a.device == "cpu" else torch.bfloat16
    rows, scores = [], {}
    pairs = None
    for quant in ("none", "8bit", "4bit"):
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        r = RewardRunner("rm", model, device=a.device, dtype=base_dtype, quantization=quant)
        if pairs is None and prefs is not None:  # chosen then rejected of each pair
            pairs = [(p["prompt"], " " + p[k]) for k in ("chosen", "rejected") for p in prefs]
        elif pairs is None:
            pairs, _ = make_pairs(a.items, LengthDist.parse(a.lengths), 3, r.tokenizer)
        enc = r.encode([ScoreInput(p, c) for p, c in pairs], "right")
        vals = []
        for i in range(0, len(enc), 8):
            vals += [float(v[0]) for v in r.forward(enc[i : i + 8])]
        scores[quant] = np.array(vals)
        r.forward(r.warmup_items(a.max_batch_tokens, a.max_batch_items))
        # On CUDA the whole set (one batch of 64 is a few milliseconds there); on a CPU 64 items.
        timed = pairs if a.device.startswith("cuda") else pairs[:64]
        res = run_inprocess(r, timed, max_tokens=a.max_batch_tokens, max_items=a.max_batch_items)
        row = {
            "quantization": quant,
            "dtype": str(base_dtype).replace("torch.", ""),
            "weights_mb": round(r.model.get_memory_footprint() / 2**20, 1),
            "tokens_per_s": round(res.tokens_per_s, 1),
            "spearman_vs_unquantized": round(spearman(scores["none"], scores[quant]), 5),
            "max_abs_diff": round(float(np.abs(scores["none"] - scores[quant]).max()), 5),
        }
        if prefs is not None:
            n = len(prefs)
            prefer = scores[quant][:n] > scores[quant][n:]
            row["accuracy_on_pairs"] = round(float(prefer.mean()), 4)
            row["agrees_with_unquantized"] = round(
                float((prefer == (scores["none"][:n] > scores["none"][n:])).mean()), 4
            )
        if a.device.startswith("cuda"):
            row["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        rows.append(row)
        print(json.dumps(row))
        del r
    out = {
        "config": {k: str(v) for k, v in vars(a).items() if k != "func"},
        "machine": machine.describe(),
        "device_name": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
        "rows": rows,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    label = Path(a.model).name if a.model else a.kind
    (a.out / f"quantized-{label}-{a.device}-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(
        json.dumps(out, indent=1)
    )
    return out
