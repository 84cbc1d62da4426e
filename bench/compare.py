"""The headline side-by-side: the server against the in-process limit, the naive per-request
server and (optionally) the same server with arrival-order batching, interleaved in one run.

    python -m bench compare --kind gpt2-small --clients 32 --items 1..8 --duration 20 --repeats 2

Each repeat measures every target once, in a rotating order, so slow drifts of the shared machine
hit all targets alike; the ratios are taken within a repeat. Results go to a JSON file and a
markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bench import machine
from bench.inprocess import measure_overhead_tokens, run_inprocess
from bench.loadgen import build_requests, load
from bench.models import DEFAULT_DIR, build, num_parameters
from bench.servers import metric_delta, start_naive_server, start_reward_server
from bench.workload import LengthDist, RequestShape, make_pairs
from reward_server.engine.calibration import apply_intra_op_threads

TARGETS = (
    "server", "server_ids", "inprocess", "inprocess_tight", "inprocess_b1", "naive", "arrival",
    "fill", "http", "invariant", "server_stream", "server_fp", "server_fp_stream",
    "server_fp_ids", "server_fp_stream_ids", "server_fp_http", "inprocess_streams",
)  # fmt: skip
SAME_PROCESS = {
    "server_ids": "server",
    "http": "server",
    "server_stream": "server",
    "server_fp_stream": "server_fp",
    "server_fp_ids": "server_fp",
    "server_fp_stream_ids": "server_fp",
    "server_fp_http": "server_fp",
}
INPROCESS = ("inprocess", "inprocess_tight", "inprocess_streams")
"""The in-process limits: a repeat's best of those measured is its `best_inprocess`."""
"""Targets measured on another target's server process with other requests or calls: token ids,
the HTTP door, and the same requests over one ScoreStream per client."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", default="small", help="model shape: gpt2-small, small or tiny")
    p.add_argument("--model", help="reward model directory (default: the bench model of --kind)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--items", default="1..8", help="items per request, e.g. 1..8 or 1")
    p.add_argument("--lengths", default="16..256", help="item length in tokens, e.g. 16..256")
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds per target")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-batch-tokens", type=int, default=2048)
    p.add_argument("--max-batch-items", type=int, default=64)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--backend", default="torch", choices=["torch", "onnx"])
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (server and in-process)")
    p.add_argument(
        "--targets",
        default="server,inprocess,inprocess_tight,inprocess_b1,naive",
        help=f"comma-separated subset of {','.join(TARGETS)}",
    )
    p.add_argument(
        "--streams",
        type=int,
        default=None,
        help="forwards at once, for every target (server --forward-streams, naive workers, "
        "in-process threads); default 1, and the server_fp targets their own default (one "
        "single-threaded worker per core)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads per forward for every target (0 = default; cores / streams); "
        "unset: the server_fp targets take their own default",
    )
    p.add_argument(
        "--http-route",
        default="get_reward",
        choices=["get_reward", "v1/score"],
        help="the `http` target: the same server process and requests through its HTTP/JSON door "
        "(bench/http_load.py) on this route",
    )
    p.add_argument(
        "--token-in",
        action="store_true",
        help="also the target server_ids: the same server process and items, sent as token ids "
        "(ScoreItem.token_ids, tokenised once up front by the model's tokenizer)",
    )
    p.add_argument("--server-arg", action="append", default=[], help="extra `serve` flag")
    # targets server_fp, server_fp_stream, server_fp_ids: another server process started with
    # the same flags and --forward-process, loaded with the requests of server, server_stream
    # and server_ids
    p.add_argument("--models-dir", type=Path, default=DEFAULT_DIR)
    p.add_argument("--out", type=Path, default=Path("runs/bench"))
    p.add_argument("--seed", type=int, default=0)


def _runner(model: str, backend: str, device: str = "cpu", threads: int = 0) -> Any:
    import torch

    if backend == "onnx":
        from reward_server.models.onnx_reward import OnnxRewardRunner

        return OnnxRewardRunner(
            "rm",
            model,
            device=device,
            max_input_tokens=0,
            head_combine="",
            intra_op_threads=threads,
        )
    from reward_server.devices import resolve_dtype
    from reward_server.models.reward import RewardRunner

    dtype = torch.float32 if device == "cpu" else resolve_dtype("auto", device)
    return RewardRunner("rm", model, device=device, dtype=dtype)


def run(a: argparse.Namespace) -> dict:
    """Run the comparison; return the result dict (also written to --out)."""
    targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    # --streams / --threads given: every target; not given: 1 stream of torch's default threads,
    # and the --forward-process server its own defaults
    fp_own_defaults = a.streams is None and a.threads is None
    a.streams = 1 if a.streams is None else a.streams
    a.threads = 0 if a.threads is None else a.threads
    if a.token_in and "server_ids" not in targets:
        targets.insert(targets.index("server") + 1 if "server" in targets else 0, "server_ids")
    bad = sorted(set(targets) - set(TARGETS))
    if bad:
        raise SystemExit(f"unknown target(s) {bad}; choose from {TARGETS}")
    if a.model:
        model = a.model
    elif a.backend == "onnx":
        from bench.onnx_speed import exported

        model = str(exported(a.kind, a.models_dir))
    else:
        model = str(build(a.kind, "reward", a.models_dir))
    dist, shape = LengthDist.parse(a.lengths), RequestShape.parse(a.items)
    threads = apply_intra_op_threads(a.threads, a.streams, a.device)
    runner = _runner(model, a.backend, a.device, threads)
    pairs, lengths = make_pairs(2000, dist, a.seed, runner.tokenizer)
    requests = build_requests(pairs, shape, 4000, a.seed, model="rm")
    # the same items (same seed), as the ids the server would make
    if {"server_ids", "server_fp_ids", "server_fp_stream_ids"} & set(targets):
        from reward_server.models.reward import ScoreInput

        def encode(texts: list[str]) -> list[list[int]]:
            return [
                e.input_ids for e in runner.encode([ScoreInput(completion=t) for t in texts], "")
            ]

        id_requests = build_requests(
            pairs, shape, 4000, a.seed, model="rm", token_in=(encode, runner.fingerprint)
        )
    serve_args = [
        "--reward-model",
        f"rm={model}",
        "--max-batch-tokens",
        str(a.max_batch_tokens),
        "--max-batch-items",
        str(a.max_batch_items),
        "--max-wait-ms",
        str(a.max_wait_ms),
        "--max-queue-items",
        str(max(4096, a.clients * shape.hi * 2)),
        "--backend",
        a.backend,
        "--device",
        a.device,
        "--forward-streams",
        str(a.streams),
        "--intra-op-threads",
        str(threads),
        *a.server_arg,
    ]
    logs = a.out / "logs"
    servers: dict[str, Any] = {}
    http_ports: dict[str, int] = {}  # server process -> its HTTP door's port
    if {"http", "server_fp_http"} & set(targets):
        from bench.http_load import http_bodies, load_http
        from reward_server.local_server import free_port

        bodies = http_bodies(requests, a.http_route)
        for name, door in (("server", "http"), ("server_fp", "server_fp_http")):
            if door in targets:
                http_ports[name] = free_port()

    def door(name: str) -> list[str]:
        return ["--http-port", str(http_ports[name])] if name in http_ports else []

    try:
        if {"server", "server_ids", "http", "server_stream"} & set(targets):
            servers["server"] = start_reward_server("server", serve_args + door("server"), logs)
        if "arrival" in targets:
            servers["arrival"] = start_reward_server("arrival", serve_args, logs, variant="arrival")
        if "fill" in targets:
            servers["fill"] = start_reward_server("fill", serve_args, logs, variant="fill")
        own = {"--forward-streams", "--intra-op-threads"}
        own_defaults = [  # serve_args without the stream and thread flags
            x
            for i, x in enumerate(serve_args)
            if x not in own and (i == 0 or serve_args[i - 1] not in own)
        ]
        fp_targets = {t for t, s in SAME_PROCESS.items() if s == "server_fp"} | {"server_fp"}
        if fp_targets & set(targets):
            # the same server with its forwards in worker processes (--forward-process), with
            # its own stream and thread defaults unless --streams / --threads were given
            fp_args = own_defaults if fp_own_defaults else serve_args
            servers["server_fp"] = start_reward_server(
                "server_fp", [*fp_args, *door("server_fp"), "--forward-process"], logs
            )
        if "invariant" in targets:  # the same server with --batch-invariant and its own
            # stream and thread defaults (one single-threaded stream per core on a CPU)
            servers["invariant"] = start_reward_server(
                "invariant", [*own_defaults, "--batch-invariant"], logs
            )
        if "naive" in targets:
            servers["naive"] = start_naive_server(
                "naive",
                model,
                logs,
                backend=a.backend,
                workers=a.streams,
                threads=threads,
                device=a.device,
            )
        runner.forward(runner.warmup_items(a.max_batch_tokens, a.max_batch_items))
        overhead = (
            measure_overhead_tokens(runner, a.max_batch_tokens, a.max_batch_items)
            if "inprocess_tight" in targets
            else None
        )
        rows: list[dict] = []
        rng = random.Random(a.seed)
        inproc_items = 64
        # inprocess_streams: one single-threaded forward stream per usable core
        per_core = {"streams": len(os.sched_getaffinity(0)), "threads": 1}
        steps = a.repeats * len(targets)
        bar = tqdm(total=steps, desc=f"compare {a.kind}", unit="target")
        for rep in range(a.repeats):
            order = targets[rep % len(targets) :] + targets[: rep % len(targets)]
            for target in order:
                pids = [os.getpid(), *(p for s in servers.values() for p in _tree(s.proc.pid))]
                meter = machine.LoadMeter(pids)
                row: dict[str, Any] = {"repeat": rep, "target": target}
                if target in servers or target in SAME_PROCESS:
                    sp = servers[SAME_PROCESS.get(target, target)]
                    snaps: dict[str, dict] = {}
                    cpu: dict[str, float] = {}

                    def on_window(which: str, sp=sp, snaps=snaps, cpu=cpu) -> None:
                        snaps[which] = sp.metrics()
                        cpu[which] = sum(map(machine.process_cpu_seconds, _tree(sp.proc.pid)))
                        cpu[f"main_{which}"] = machine.process_cpu_seconds(sp.proc.pid)
                        cpu[f"client_{which}"] = machine.process_cpu_seconds(os.getpid())

                    start = rng.randrange(len(requests))
                    kw = dict(
                        clients=a.clients,
                        duration=a.duration,
                        warmup=a.warmup,
                        on_window=on_window,
                    )
                    if target in ("http", "server_fp_http"):
                        url = f"http://{sp.host}:{http_ports[SAME_PROCESS[target]]}"
                        res = load_http(url, a.http_route, bodies[start:] + bodies, **kw)
                    elif target in ("server_ids", "server_fp_ids"):
                        res = load(sp.address, id_requests[start:] + id_requests, **kw)
                    elif target == "server_fp_stream_ids":
                        ids = id_requests[start:] + id_requests
                        res = load(sp.address, ids, stream=True, **kw)
                    elif target in ("server_stream", "server_fp_stream"):
                        res = load(sp.address, requests[start:] + requests, stream=True, **kw)
                    else:
                        res = load(sp.address, requests[start:] + requests, **kw)
                    row.update(res.summary())
                    if res.requests:  # the server's CPU (all threads, and its forward processes)
                        row["server_cpu_us_per_request"] = round(
                            (cpu["end"] - cpu["start"]) / res.requests * 1e6, 1
                        )
                        # of which its main process (the rest: its --forward-process workers)
                        row["server_main_cpu_us_per_request"] = round(
                            (cpu["main_end"] - cpu["main_start"]) / res.requests * 1e6, 1
                        )
                        # the load generator's process: its clients share the machine
                        row["client_cpu_us_per_request"] = round(
                            (cpu["client_end"] - cpu["client_start"]) / res.requests * 1e6, 1
                        )
                    if sp.metrics_port:
                        row["server_metrics"] = metric_delta(
                            snaps["start"], snaps["end"], "rm", a.duration
                        )
                    # the in-process pass scores as many items as the fastest server did in its
                    # window (so it lasts about as long)
                    inproc_items = max(inproc_items, min(4000, int(res.items_per_s * a.duration)))
                else:
                    sample = rng.sample(pairs, min(len(pairs), inproc_items))
                    cap = 1 if target == "inprocess_b1" else a.max_batch_items
                    if target == "inprocess_b1":
                        sample = sample[: max(8, len(sample) // 4)]
                    r = run_inprocess(
                        runner,
                        sample,
                        max_tokens=a.max_batch_tokens,
                        max_items=cap,
                        order="tight" if target == "inprocess_tight" else "sorted",
                        overhead_tokens=overhead,
                        **(per_core if target == "inprocess_streams" else {"streams": a.streams}),
                    )
                    row.update(
                        items=r.items,
                        real_tokens=r.real_tokens,
                        seconds=round(r.seconds, 2),
                        tokens_per_s=round(r.tokens_per_s, 1),
                        items_per_s=round(r.items_per_s, 2),
                        padding_efficiency=round(r.padding_efficiency, 4),
                        batches=r.batches,
                        tokenize_s=round(r.tokenize_seconds, 3),
                    )
                row["load"] = meter.stop().summary()
                rows.append(row)
                bar.update(1)
                bar.set_postfix(target=target, tok_s=row.get("tokens_per_s"))
        bar.close()
    finally:
        for s in servers.values():
            s.stop()
    summary = summarize(rows)
    info = machine.describe()
    params = num_parameters(Path(model)) if a.backend == "torch" else None
    if params and a.device.startswith("cuda") and "gpu" in info:
        for t in targets:
            if t in summary:
                u = machine.mfu(params, summary[t]["tokens_per_s"], info["gpu"])
                summary[t]["mfu"] = None if u is None else round(u, 4)
    result = {
        "config": {k: str(v) for k, v in vars(a).items() if k != "func"},
        "inprocess_overhead_tokens": overhead,
        "model": model,
        "parameters": params,
        "machine": info,
        "rows": rows,
        "summary": summary,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    name = f"compare-{a.kind}-c{a.clients}-i{shape}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    (a.out / name.replace("..", "-")).write_text(json.dumps(result, indent=1))
    print(markdown(result))
    return result


def _tree(pid: int) -> list[int]:
    """A process and its descendants (a server's forward processes, `--forward-process`)."""
    import psutil

    try:
        return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        return [pid]


def rate(row: dict) -> float:
    """Real tokens/s of a row: for a server, what its forwards completed in the window (exact
    even when requests outlast the window); in-process rows are timed directly."""
    fwd = row.get("server_metrics", {}).get("forwarded_tokens_per_s", float("nan"))
    return fwd if fwd == fwd and fwd > 0 else row["tokens_per_s"]


def summarize(rows: list[dict]) -> dict:
    """Median throughput per target and the within-repeat ratios (on `rate`)."""
    out: dict[str, Any] = {}
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["target"], []).append(r)
    for t, rs in by.items():
        out[t] = {"tokens_per_s": statistics.median(rate(r) for r in rs)}
    reps = sorted({r["repeat"] for r in rows})

    def ratio(num: str, den: str) -> list[float]:
        vals = []
        for rep in reps:
            x = {r["target"]: r for r in rows if r["repeat"] == rep}
            if num in x and den in x and rate(x[den]):
                vals.append(round(rate(x[num]) / rate(x[den]), 3))
        return vals

    limits: dict[int, float] = {}
    for r in rows:
        if r["target"] in INPROCESS:
            limits[r["repeat"]] = max(limits.get(r["repeat"], 0.0), rate(r))
    for target in (
        "server",
        "server_ids",
        "server_stream",
        "server_fp",
        "server_fp_stream",
        "server_fp_ids",
        "server_fp_stream_ids",
        "server_fp_http",
    ):
        best = [
            round(rate(x) / limits[x["repeat"]], 3)
            for x in rows
            if x["target"] == target and limits.get(x["repeat"])
        ]
        if best:
            out[f"{target}/best_inprocess"] = {"each": best, "median": statistics.median(best)}
    for num, den in [
        ("server", "inprocess"),
        ("server", "inprocess_tight"),
        ("inprocess_tight", "inprocess"),
        ("server", "naive"),
        ("server_ids", "inprocess"),
        ("server_ids", "server"),
        ("server_ids", "naive"),
        ("inprocess", "inprocess_b1"),
        ("naive", "inprocess"),
        ("arrival", "inprocess"),
        ("server", "arrival"),
        ("fill", "inprocess"),
        ("server", "fill"),
        ("invariant", "server"),
        ("invariant", "inprocess"),
        ("http", "server"),
        ("server_stream", "server"),
        ("server_stream", "inprocess"),
        ("server_stream", "naive"),
        ("server_fp", "inprocess"),
        ("server_fp", "server"),
        ("server_fp", "naive"),
        ("server_fp_stream", "inprocess"),
        ("server_fp_stream", "server_stream"),
        ("server_fp_stream", "naive"),
        ("server_fp_ids", "inprocess"),
        ("server_fp_ids", "server_fp"),
        ("server_fp_stream_ids", "inprocess"),
        ("server_fp_stream_ids", "server_fp_stream"),
        ("server_fp_http", "inprocess"),
        ("server_fp_http", "server_fp"),
        ("inprocess_streams", "inprocess"),
    ]:
        vals = ratio(num, den)
        if vals:
            out[f"{num}/{den}"] = {"each": vals, "median": statistics.median(vals)}
    return out


def markdown(result: dict) -> str:
    """A table of the rows and the ratios."""
    lines = [
        "| repeat | target | real tok/s | client tok/s | items/s | p50 ms | p99 ms | batch items "
        "| pad eff | queue ms | server CPU us/req (main process) | client CPU us/req "
        "| others' cores |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        m = r.get("server_metrics", {})
        eff = m.get("padding_efficiency", r.get("padding_efficiency", float("nan")))
        lines.append(
            f"| {r['repeat']} | {r['target']} | {rate(r):.0f} | {r['tokens_per_s']:.0f} | "
            f"{r['items_per_s']:.1f} | "
            f"{r.get('p50_ms', float('nan')):.0f} | {r.get('p99_ms', float('nan')):.0f} | "
            f"{m.get('mean_batch_items', float('nan')):.1f} | {eff:.3f} | "
            f"{m.get('mean_queue_ms', float('nan')):.0f} | "
            f"{r.get('server_cpu_us_per_request', float('nan')):.0f} "
            f"({r.get('server_main_cpu_us_per_request', float('nan')):.0f}) | "
            f"{r.get('client_cpu_us_per_request', float('nan')):.0f} | "
            f"{r['load']['others_cores']:.2f} |"
        )
    lines.append("")
    for k, v in result["summary"].items():
        if "/" in k:
            lines.append(f"- {k}: median {v['median']:.3f} (each repeat: {v['each']})")
        elif v.get("mfu") is not None:
            lines.append(f"- {k}: MFU {v['mfu']:.3f} at {v['tokens_per_s']:.0f} tokens/s")
    return "\n".join(lines)
