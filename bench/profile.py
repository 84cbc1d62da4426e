"""Where the server's time goes under load: py-spy samples of the server process, by thread and
by job (forward, tokenisation, protobuf conversion, gRPC and the event loop, batching).

    python -m bench profile --kind tiny --clients 32 --items 1 --duration 12

Needs py-spy (``pip install py-spy``; it reads the process's memory, so it needs ptrace rights).
Only on-CPU samples count (no --idle), so each share is of the server's busy time.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import machine
from bench.loadgen import build_requests, load
from bench.models import DEFAULT_DIR, build
from bench.servers import start_reward_server
from bench.workload import LengthDist, RequestShape, make_pairs

# event-loop jobs -> substrings of frame names; the first match from the leaf up wins
JOBS = {
    "tokenisation": ("encode", "render", "_encode_plus", "fast_encoder"),
    "protobuf conversion": ("convert.", "score_inputs", "score_response", "logprobs_response"),
    "batcher": ("DynamicBatcher", "plan_window", "_window", "_drop_dead", "_dispatch"),
    "metrics": ("prometheus", "ServerMetrics", "on_batch", "on_queue"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", default="tiny")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--items", default="1")
    p.add_argument("--lengths", default="16..256")
    p.add_argument("--duration", type=float, default=12.0)
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--token-in", action="store_true", help="send the items as token ids")
    p.add_argument("--stream", action="store_true", help="each client over one ScoreStream")
    p.add_argument("--server-arg", action="append", default=[], help="extra `serve` flag")
    p.add_argument("--models-dir", type=Path, default=DEFAULT_DIR)
    p.add_argument("--out", type=Path, default=Path("runs/bench"))


def classify(thread: str, frames: list[str]) -> str:
    """The job of one sample (frames root first)."""
    if thread.startswith("tokenize"):
        return "tokenisation (thread pool)"
    if thread.startswith("forward"):
        return "forward (worker thread)"
    if "_poll_wrapper" in thread:
        return "gRPC completion-queue poller"
    if frames and "select" in frames[-1].lower():
        return "event loop waiting in epoll"
    for frame in reversed(frames):
        for job, keys in JOBS.items():
            if any(k in frame for k in keys):
                return job
    return "gRPC handlers, asyncio and the rest"


def aggregate(raw: str) -> dict:
    """py-spy raw (collapsed) output -> samples by thread and by job."""
    by_thread: collections.Counter = collections.Counter()
    by_job: collections.Counter = collections.Counter()
    for line in raw.splitlines():
        stack, _, n = line.rstrip().rpartition(" ")
        if not stack or not n.isdigit():  # a frame name spanning lines (a docstring as a name)
            continue
        frames = stack.split(";")
        thread = frames[0].split(": ", 1)[-1].strip()
        by_thread[thread.split("_")[0] if "_" in thread else thread] += int(n)
        by_job[classify(thread, frames[1:])] += int(n)
    return {"by_thread": dict(by_thread.most_common()), "by_job": dict(by_job.most_common())}


def run(a: argparse.Namespace) -> dict:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        raise SystemExit("bench profile needs py-spy: pip install py-spy")
    from transformers import AutoTokenizer

    model = str(build(a.kind, "reward", a.models_dir))
    tok = AutoTokenizer.from_pretrained(model)
    pairs, _ = make_pairs(2000, LengthDist.parse(a.lengths), 0, tok)
    token_in = None
    if a.token_in:
        from reward_server.fingerprint import tokenizer_fingerprint

        token_in = (lambda texts: tok(texts)["input_ids"], tokenizer_fingerprint(tok))
    requests = build_requests(pairs, RequestShape.parse(a.items), 4000, 0, "rm", token_in)
    sp = start_reward_server(
        "profile", ["--reward-model", f"rm={model}", *a.server_arg], a.out / "logs"
    )
    raw_path = a.out / "profile-raw.txt"
    a.out.mkdir(parents=True, exist_ok=True)
    try:
        cmd = [
            spy,
            "record",
            "-p",
            str(sp.proc.pid),
            "-d",
            str(int(a.duration)),
            "-r",
            str(a.rate),
            "--threads",
            "-f",
            "raw",
            "-o",
            str(raw_path),
            "--nonblocking",
        ]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        res = load(
            sp.address,
            requests,
            clients=a.clients,
            duration=a.duration,
            warmup=0.5,
            stream=a.stream,
        )
        proc.wait(60)
    finally:
        sp.stop()
    agg = aggregate(raw_path.read_text())
    total = sum(agg["by_job"].values())
    seconds = a.duration
    out = {
        "config": {k: str(v) for k, v in vars(a).items() if k != "func"},
        # on-CPU samples per request completed, in microseconds (all threads)
        "cpu_us_per_request_by_job": {
            k: round(v / a.rate / max(1, res.requests) * 1e6 * a.duration / res.seconds, 1)
            for k, v in agg["by_job"].items()
        },
        "machine": machine.describe(),
        "load": res.summary(),
        "cores_busy_by_job": {k: round(v / a.rate / seconds, 3) for k, v in agg["by_job"].items()},
        "share_by_job": {k: round(v / total, 3) for k, v in agg["by_job"].items()},
        "cores_busy_by_thread": {
            k: round(v / a.rate / seconds, 3) for k, v in agg["by_thread"].items()
        },
    }
    print(json.dumps(out, indent=1))
    (a.out / f"profile-{a.kind}-i{a.items}-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(
        json.dumps(out, indent=1)
    )
    return out
