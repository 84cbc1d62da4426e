"""Throughput and p99 latency against concurrency and against sequence length, for the server,
the naive per-request server and the in-process limit; drawn as PNG.

    python -m bench curves --kind small --sweep concurrency --values 1,2,4,8,16,32,64,128
    python -m bench curves --kind small --sweep length --values 32,64,128,256,512,1024

Concurrency points send one item per request with lengths 16..256; length points send one item of
exactly that length from `--clients` clients. Each point measures the in-process limit first, then
the two servers, with a warm-up long enough for the closed loop to reach steady state.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from tqdm import tqdm

from bench import machine
from bench.compare import _runner
from bench.inprocess import run_inprocess
from bench.loadgen import build_requests, load
from bench.models import DEFAULT_DIR, build
from bench.servers import metric_delta, start_naive_server, start_reward_server
from bench.workload import LengthDist, RequestShape, make_pairs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", default="small")
    p.add_argument("--sweep", choices=("concurrency", "length"), default="concurrency")
    p.add_argument("--values", default="", help="comma-separated points (default per sweep)")
    p.add_argument("--clients", type=int, default=16, help="clients of a length sweep")
    p.add_argument("--lengths", default="16..256", help="item lengths of a concurrency sweep")
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--max-batch-tokens", type=int, default=2048)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--naive", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--models-dir", type=Path, default=DEFAULT_DIR)
    p.add_argument("--out", type=Path, default=Path("runs/bench"))
    p.add_argument("--png", type=Path, default=None, help="default docs/bench_<sweep>.png")


def run(a: argparse.Namespace) -> dict:
    default = "1,2,4,8,16,32,64,128" if a.sweep == "concurrency" else "32,64,128,256,512,1024"
    values = [int(v) for v in (a.values or default).split(",")]
    model = str(build(a.kind, "reward", a.models_dir))
    runner = _runner(model, "torch")
    serve_args = [
        "--reward-model",
        f"rm={model}",
        "--max-batch-tokens",
        str(a.max_batch_tokens),
        "--max-wait-ms",
        str(a.max_wait_ms),
    ]
    logs = a.out / "logs"
    servers = {"server": start_reward_server("server", serve_args, logs)}
    if a.naive:
        servers["naive"] = start_naive_server("naive", model, logs)
    rows = []
    try:
        for v in tqdm(values, desc=f"curve {a.sweep}"):
            dist = LengthDist.parse(a.lengths) if a.sweep == "concurrency" else LengthDist(v, v)
            clients = v if a.sweep == "concurrency" else a.clients
            pairs, _ = make_pairs(600, dist, v, runner.tokenizer)
            requests = build_requests(pairs, RequestShape(1, 1), 2000, v, model="rm")
            meter = machine.LoadMeter([os.getpid()])
            ip = run_inprocess(
                runner,
                pairs[: max(16, min(256, 4 * clients))],
                max_tokens=a.max_batch_tokens,
                max_items=64,
            )
            rows.append(
                {
                    "x": v,
                    "target": "inprocess",
                    "tokens_per_s": ip.tokens_per_s,
                    "load": meter.stop().summary(),
                }
            )
            # closed loop: latency ~ clients x mean tokens / throughput; warm up past it
            mean_len = (dist.lo + dist.hi) / 2
            warmup = min(30.0, 2.0 + 1.5 * clients * mean_len / ip.tokens_per_s)
            for name, sp in servers.items():
                snaps: dict[str, dict] = {}

                def on_window(which: str, sp=sp, snaps=snaps) -> None:
                    snaps[which] = sp.metrics()

                meter = machine.LoadMeter([os.getpid(), sp.proc.pid])
                res = load(
                    sp.address,
                    requests,
                    clients=clients,
                    duration=a.duration,
                    warmup=warmup,
                    on_window=on_window,
                )
                row = {"x": v, "target": name, **res.summary(), "load": meter.stop().summary()}
                if sp.metrics_port:
                    row["server_metrics"] = metric_delta(
                        snaps["start"], snaps["end"], "rm", a.duration
                    )
                rows.append(row)
    finally:
        for sp in servers.values():
            sp.stop()
    out = {
        "config": {k: str(v) for k, v in vars(a).items() if k != "func"},
        "model": model,
        "machine": machine.describe(),
        "rows": rows,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"curves-{a.sweep}-{a.kind}-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(
        json.dumps(out, indent=1)
    )
    png = a.png or Path("docs") / f"bench_{a.sweep}.png"
    plot(out, png)
    print(f"wrote {png}")
    return out


def plot(result: dict, png: Path) -> None:
    """Throughput (left) and p99 latency (right) against the swept value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    sweep = cfg["sweep"]
    rows = result["rows"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"server": "o-", "naive": "s--", "inprocess": "k:"}
    labels = {
        "server": "reward server (dynamic batching)",
        "naive": "naive server (one forward per request)",
        "inprocess": "in-process limit (sorted batches)",
    }
    for target in ("server", "naive", "inprocess"):
        pts = sorted((r["x"], r) for r in rows if r["target"] == target)
        if not pts:
            continue
        xs = [x for x, _ in pts]
        ax1.plot(xs, [r["tokens_per_s"] for _, r in pts], styles[target], label=labels[target])
        if target != "inprocess":
            ax2.plot(xs, [r["p99_ms"] for _, r in pts], styles[target], label=labels[target])
    xlabel = (
        "concurrent clients (1 item per request)"
        if sweep == "concurrency"
        else (f"item length, tokens ({cfg['clients']} clients, 1 item per request)")
    )
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
    ax1.set_ylabel("real tokens / s")
    ax2.set_ylabel("p99 latency, ms")
    ax2.set_yscale("log")
    ax1.legend(fontsize=8)
    m = result["machine"]
    fig.suptitle(
        f"{cfg['kind']} reward model, {m.get('Model name', 'CPU')} x{m.get('nproc')}, "
        f"max_batch_tokens {cfg['max_batch_tokens']}, {m['date']}",
        fontsize=9,
    )
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
