"""Fair sharing between tenants, side by side on one server process:

    python -m bench tenants --kind tiny --duration 20 --repeats 2

Phases (each repeat runs them all, in a rotating order; tenants named by the ``tenant`` metadata
key, auth off):

- ``idle``: the light tenant alone: 1 client, 1 item per request, one request at a time.
- ``single``: the heavy tenant alone: 32 closed-loop clients, 1-8 items per request.
- ``mixed``: heavy and light at once, as two tenants.
- ``one_queue``: the same two loads sent without a tenant (one tenant, one shared queue: the
  batcher without fair sharing), for contrast.
- ``shares``: two saturating tenants ``a`` (``--tenant-share a=3``) and ``b`` (share 1), each
  like the heavy one.

Targets (issue 16): the light tenant's p99 in ``mixed`` <= 2x its p99 in ``idle``; the server's
forwarded tokens/s in ``mixed`` >= 0.95x ``single``'s; in ``shares`` the tokens/s of a / b within
10 % of 3 (the server's per-tenant token counters over the window).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import grpc
from tqdm import tqdm

from bench import machine
from bench.loadgen import SCORE_METHOD, LoadResult, build_requests, client_loop, run_window
from bench.models import DEFAULT_DIR, build
from bench.servers import metric_delta, start_reward_server
from bench.workload import LengthDist, RequestShape, make_pairs

PHASES = ("idle", "single", "mixed", "one_queue", "shares")
Group = tuple[str, list[tuple[bytes, int]], int, tuple[tuple[str, str], ...]]
"""One tenant's load: label, serialised requests, clients, call metadata."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", default="tiny", help="model shape: gpt2-small, small or tiny")
    p.add_argument("--heavy-clients", type=int, default=32)
    p.add_argument("--heavy-items", default="1..8", help="items per heavy request")
    p.add_argument("--lengths", default="16..256", help="item length in tokens")
    p.add_argument("--share", type=float, default=3.0, help="tenant a's share against b's 1")
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds per phase")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--phases", default=",".join(PHASES), help=f"subset of {','.join(PHASES)}")
    p.add_argument("--max-batch-tokens", type=int, default=2048)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--server-arg", action="append", default=[], help="extra `serve` flag")
    p.add_argument("--models-dir", type=Path, default=DEFAULT_DIR)
    p.add_argument("--out", type=Path, default=Path("runs/bench"))
    p.add_argument("--seed", type=int, default=0)


async def _run_groups(
    address: str, groups: list[Group], warmup: float, duration: float, on_window: Any
) -> dict[str, LoadResult]:
    """Every group's closed-loop clients at once over one shared window (one channel each)."""
    opts = [("grpc.max_receive_message_length", 64 << 20)]
    channels = [grpc.aio.insecure_channel(address, options=opts) for _ in groups]
    try:
        for ch in channels:
            await asyncio.wait_for(ch.channel_ready(), 30)
        now = time.perf_counter()
        window = (now + warmup, now + warmup + duration)
        results: dict[str, LoadResult] = {}
        tasks = []
        for ch, (label, reqs, clients, md) in zip(channels, groups, strict=True):
            call = ch.unary_unary(SCORE_METHOD)
            res = results[label] = LoadResult(clients, duration)
            step = max(1, len(reqs) // clients)
            tasks += [
                asyncio.ensure_future(
                    client_loop(
                        lambda data, call=call, md=md: call(
                            data, timeout=600.0, metadata=md or None
                        ),
                        reqs,
                        c * step,
                        window,
                        res,
                    )
                )
                for c in range(clients)
            ]
        await run_window(tasks, window, on_window)
        return results
    finally:
        for ch in channels:
            await ch.close()


def _tenant_delta(before: dict, after: dict, metric: str, tenant: str) -> float:
    key = f'reward_server_{metric}{{model="rm",tenant="{tenant}"}}'
    return after.get(key, 0.0) - before.get(key, 0.0)


def _tenant_queue_ms(before: dict, after: dict, tenant: str) -> float:
    """Mean time the tenant's items waited in the batcher's queue over the window, ms."""
    n = _tenant_delta(before, after, "tenant_queue_seconds_count", tenant)
    s = _tenant_delta(before, after, "tenant_queue_seconds_sum", tenant)
    return 1e3 * s / n if n else float("nan")


def run(a: argparse.Namespace) -> dict:
    """Run every phase `repeats` times; return the result dict (also written to --out)."""
    from transformers import AutoTokenizer

    phases = [x.strip() for x in a.phases.split(",") if x.strip()]
    bad = sorted(set(phases) - set(PHASES))
    if bad:
        raise SystemExit(f"unknown phase(s) {bad}; choose from {PHASES}")
    model = str(build(a.kind, "reward", a.models_dir))
    tokenizer = AutoTokenizer.from_pretrained(model)
    pairs, _ = make_pairs(2000, LengthDist.parse(a.lengths), a.seed, tokenizer)
    heavy = build_requests(pairs, RequestShape.parse(a.heavy_items), 4000, a.seed, model="rm")
    other = build_requests(pairs, RequestShape.parse(a.heavy_items), 4000, a.seed + 1, "rm")
    light = build_requests(pairs, RequestShape(1, 1), 1000, a.seed + 2, model="rm")
    hc = a.heavy_clients

    def tenant(name: str) -> tuple[tuple[str, str], ...]:
        return (("tenant", name),)

    plans: dict[str, list[Group]] = {
        "idle": [("light", light, 1, tenant("light"))],
        "single": [("heavy", heavy, hc, tenant("heavy"))],
        "mixed": [("heavy", heavy, hc, tenant("heavy")), ("light", light, 1, tenant("light"))],
        "one_queue": [("heavy", heavy, hc, ()), ("light", light, 1, ())],
        "shares": [("a", heavy, hc, tenant("a")), ("b", other, hc, tenant("b"))],
    }
    serve_args = [
        "--reward-model",
        f"rm={model}",
        "--device",
        "cpu",
        "--max-batch-tokens",
        str(a.max_batch_tokens),
        "--max-wait-ms",
        str(a.max_wait_ms),
        "--max-queue-items",
        str(max(4096, 4 * hc * 8)),
        "--tenant-share",
        f"a={a.share}",
        *a.server_arg,
    ]
    sp = start_reward_server("tenants", serve_args, a.out / "logs")
    rows: list[dict] = []
    try:
        bar = tqdm(total=a.repeats * len(phases), desc="tenants", unit="phase")
        for rep in range(a.repeats):
            order = phases[rep % len(phases) :] + phases[: rep % len(phases)]
            for phase in order:
                snaps: dict[str, dict] = {}

                def on_window(which: str, snaps: dict = snaps) -> None:
                    snaps[which] = sp.metrics()

                meter = machine.LoadMeter([os.getpid(), sp.proc.pid])
                res = asyncio.run(
                    _run_groups(sp.address, plans[phase], a.warmup, a.duration, on_window)
                )
                row: dict[str, Any] = {"repeat": rep, "phase": phase}
                row["groups"] = {k: r.summary() for k, r in res.items()}
                row["server"] = metric_delta(snaps["start"], snaps["end"], "rm", a.duration)
                tenants = ("heavy", "light", "a", "b", "default")
                before, after = snaps["start"], snaps["end"]
                row["tenant_tokens_per_s"] = {
                    t: _tenant_delta(before, after, "tenant_tokens_total", t) / a.duration
                    for t in tenants
                }
                row["tenant_queue_ms"] = {t: _tenant_queue_ms(before, after, t) for t in tenants}
                row["load"] = meter.stop().summary()
                rows.append(row)
                bar.update(1)
        bar.close()
    finally:
        sp.stop()
    result = {
        "config": {k: str(v) for k, v in vars(a).items() if k != "func"},
        "model": model,
        "machine": machine.describe(),
        "rows": rows,
        "summary": summarize(rows, a.share),
    }
    a.out.mkdir(parents=True, exist_ok=True)
    name = f"tenants-{a.kind}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    (a.out / name).write_text(json.dumps(result, indent=1))
    print(markdown(result))
    return result


def summarize(rows: list[dict], share: float) -> dict:
    """Per repeat: the three ratios of the targets (and the one-queue contrast); their medians."""
    out: dict[str, Any] = {}
    reps = sorted({r["repeat"] for r in rows})

    def each(fn: Any) -> list[float]:
        vals = []
        for rep in reps:
            x = {r["phase"]: r for r in rows if r["repeat"] == rep}
            with contextlib.suppress(KeyError, ZeroDivisionError):
                vals.append(round(fn(x), 3))
        return vals

    def p99(x: dict, phase: str) -> float:
        return x[phase]["groups"]["light"]["p99_ms"]

    def fwd(x: dict, phase: str) -> float:
        return x[phase]["server"]["forwarded_tokens_per_s"]

    ratios = {
        "light_p99_mixed/idle": (lambda x: p99(x, "mixed") / p99(x, "idle"), "<= 2"),
        "light_p99_one_queue/idle": (lambda x: p99(x, "one_queue") / p99(x, "idle"), ""),
        "throughput_mixed/single": (lambda x: fwd(x, "mixed") / fwd(x, "single"), ">= 0.95"),
        "throughput_one_queue/single": (lambda x: fwd(x, "one_queue") / fwd(x, "single"), ""),
        "tokens_a/b": (
            lambda x: (
                x["shares"]["tenant_tokens_per_s"]["a"] / x["shares"]["tenant_tokens_per_s"]["b"]
            ),
            f"{share:g} +- 10%",
        ),
    }
    for key, (fn, target) in ratios.items():
        vals = each(fn)
        if vals:
            out[key] = {"each": vals, "median": statistics.median(vals), "target": target}
    return out


def markdown(result: dict) -> str:
    """A table of the phases and the ratios against their targets."""
    lines = [
        "| repeat | phase | tenant | requests/s | p50 ms | p99 ms | queue ms | server tok/s "
        "| tenant tok/s | batch items | pad eff | others' cores | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        m = r["server"]
        for label, g in r["groups"].items():
            tok = r["tenant_tokens_per_s"].get(label, float("nan"))
            queue = r["tenant_queue_ms"].get(label, float("nan"))
            if r["phase"] == "one_queue":  # one tenant ("default") for both loads
                tok, queue = float("nan"), r["tenant_queue_ms"]["default"]
            lines.append(
                f"| {r['repeat']} | {r['phase']} | {label} | {g['requests'] / g['seconds']:.1f} "
                f"| {g['p50_ms']:.1f} | {g['p99_ms']:.1f} | {queue:.1f} "
                f"| {m['forwarded_tokens_per_s']:.0f} "
                f"| {tok:.0f} | {m['mean_batch_items']:.1f} | {m['padding_efficiency']:.3f} "
                f"| {r['load']['others_cores']:.2f} | {r['load']['loadavg_1m']:.2f} |"
            )
    lines.append("")
    for k, v in result["summary"].items():
        target = f" (target {v['target']})" if v["target"] else ""
        lines.append(f"- {k}: median {v['median']:.3f}{target}; each repeat: {v['each']}")
    return "\n".join(lines)
