"""ReferenceLogProbs: peak memory against the number of sequences, throughput against the
in-process limit, and the protobuf cost of a large response.

    python -m bench reference --kind small --seqs 8,16,32,64 --length 512

The server's peak memory is its kernel high-water mark (VmHWM, reset through
/proc/PID/clear_refs before each request) minus its resident size before the request. The
full [batch, seq, vocab] logits a naive implementation builds would need
``seqs x length x vocab x 4`` bytes (twice, with the log-softmax); the server computes the
log-softmax in slices of `--logprob-slice-mb` and runs batches of at most `--max-batch-tokens`.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import numpy as np

from bench import machine
from bench.models import DEFAULT_DIR, build
from bench.servers import start_reward_server


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", default="small")
    p.add_argument("--seqs", default="8,16,32,64", help="sequences per request")
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--response", type=int, default=256, help="response tokens per sequence")
    p.add_argument("--max-batch-tokens", type=int, default=2048)
    p.add_argument("--logprob-slice-mb", type=float, default=64.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--models-dir", type=Path, default=DEFAULT_DIR)
    p.add_argument("--out", type=Path, default=Path("runs/bench"))


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _reset_peak(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def sequences(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(length)] for _ in range(n)]


def protobuf_cost(arrays: list[np.ndarray], repeats: int = 10) -> dict:
    """Median ms to build + serialise the response (server) and parse + convert it (client)."""
    from reward_server.api.rlhf.v1 import reward_service_pb2 as pb
    from reward_server.engine.engine import Timing
    from reward_server.serve import convert

    enc, dec = [], []
    data = b""
    for _ in range(repeats):
        t0 = time.perf_counter()
        data = convert.logprobs_response("ref", arrays, Timing(), "id").SerializeToString()
        t1 = time.perf_counter()
        resp = pb.ReferenceLogProbsResponse.FromString(data)
        _ = [np.asarray(r.logprobs, dtype=np.float32) for r in resp.results]  # as the client does
        t2 = time.perf_counter()
        enc.append(t1 - t0)
        dec.append(t2 - t1)
    return {
        "values": int(sum(a.size for a in arrays)),
        "bytes": len(data),
        "encode_ms": round(statistics.median(enc) * 1e3, 2),
        "decode_ms": round(statistics.median(dec) * 1e3, 2),
    }


def run(a: argparse.Namespace) -> dict:
    import torch

    from bench.inprocess import sorted_batches
    from reward_server.client import RewardClient
    from reward_server.models.reference import ReferenceRunner, RefSequence

    model = str(build(a.kind, "reference", a.models_dir))
    runner = ReferenceRunner(
        "ref",
        model,
        device="cpu",
        dtype=torch.float32,
        slice_bytes=int(a.logprob_slice_mb * (1 << 20)),
    )
    vocab = runner.vocab_size
    args = [
        "--reference-model",
        f"ref={model}",
        "--max-batch-tokens",
        str(a.max_batch_tokens),
        "--logprob-slice-mb",
        str(a.logprob_slice_mb),
        "--max-items-per-request",
        "512",
    ]
    sp = start_reward_server("reference", args, a.out / "logs")
    rows = []
    start = a.length - a.response
    try:
        with RewardClient(sp.address, timeout=3600) as client:
            for rep in range(a.repeats):
                for n in [int(x) for x in a.seqs.split(",")]:
                    seqs = sequences(n, a.length, vocab, seed=rep * 1000 + n)
                    starts = [start] * n
                    meter = machine.LoadMeter([sp.proc.pid])
                    rss0 = _status_kb(sp.proc.pid, "VmRSS")
                    reset = _reset_peak(sp.proc.pid)
                    t0 = time.perf_counter()
                    got = client.reference_logprobs(seqs, starts)
                    server_s = time.perf_counter() - t0
                    peak = _status_kb(sp.proc.pid, "VmHWM")
                    load = meter.stop().summary()
                    # the in-process limit: the same runner code, sorted batches, same budget
                    items = [RefSequence(s, start, 1.0) for s in seqs]
                    t0 = time.perf_counter()
                    ref = [None] * n
                    for b in sorted_batches([a.length] * n, a.max_batch_tokens, 512):
                        for i, arr in zip(b, runner.forward([items[i] for i in b]), strict=True):
                            ref[i] = arr
                    inproc_s = time.perf_counter() - t0
                    diff = max(float(np.abs(g - r).max()) for g, r in zip(got, ref, strict=True))
                    tokens = n * a.length
                    row = {
                        "repeat": rep,
                        "sequences": n,
                        "tokens": tokens,
                        "server_s": round(server_s, 2),
                        "inprocess_s": round(inproc_s, 2),
                        "server_tokens_per_s": round(tokens / server_s, 1),
                        "inprocess_tokens_per_s": round(tokens / inproc_s, 1),
                        "ratio": round(inproc_s / server_s, 3),
                        "rss_before_mb": round(rss0 / 1024, 1),
                        "peak_rss_mb": round(peak / 1024, 1),
                        "peak_rss_increase_mb": round((peak - rss0) / 1024, 1) if reset else None,
                        "full_logits_mb": round(n * a.length * runner.logits_vocab * 4 / 2**20, 1),
                        "max_abs_diff_vs_inprocess": diff,
                        "load": load,
                    }
                    if n == max(int(x) for x in a.seqs.split(",")):
                        row["protobuf"] = protobuf_cost(got)
                    rows.append(row)
                    print(json.dumps(row))
    finally:
        sp.stop()
    rng = np.random.default_rng(0)
    synthetic = [rng.standard_normal(512).astype(np.float32) for _ in range(64)]
    out = {
        "config": {k: str(v) for k, v in vars(a).items() if k != "func"},
        "protobuf_64x512": protobuf_cost(synthetic, repeats=20),
        "model": model,
        "vocab": runner.logits_vocab,
        "slice_rows": runner.slice_rows,
        "machine": machine.describe(),
        "rows": rows,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"reference-{a.kind}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=1))
    return out
