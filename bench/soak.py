"""Soak: hours of mixed normal and hostile traffic against one server, its memory (RSS) and open
file descriptors sampled every few seconds and plotted.

    python -m bench soak --duration 3600 --warmup 300          # the figure in docs/BENCHMARKS.md
    python -m bench soak --duration 120 --warmup 30            # the version `make test` runs

Traffic, from `--clients` threads in a closed loop, each request drawn at random: Score and
ReferenceLogProbs of normal items (most of it), bytes that are no message, inputs over the token
limit, unknown models, calls cancelled in flight, deadlines that expire in the queue, and
ScoreStreams aborted after their first answer. The result (JSON) says the RSS growth from the end
of the warm-up to the end and the descriptor counts; the PNG shows both over time.
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
from pathlib import Path
from typing import Any

import grpc

from reward_server.api.rlhf.v1 import reward_service_pb2 as pb

WORDS = "the cat dog bird fish tree river good bad big small red blue runs sat".split()


def _pair(rng: random.Random, n: int) -> pb.ScoreItem:
    return pb.ScoreItem(
        prompt=" ".join(rng.choice(WORDS) for _ in range(max(1, n // 3))),
        completion=" " + " ".join(rng.choice(WORDS) for _ in range(n)),
    )


def one_request(ch: grpc.Channel, rng: random.Random, vocab: int) -> str:
    """Send one request of the mix; its outcome (a kind and a code) as a string."""
    r = rng.random()
    score = ch.unary_unary(
        "/rlhf.v1.RewardService/Score",
        request_serializer=pb.ScoreRequest.SerializeToString,
        response_deserializer=pb.ScoreResponse.FromString,
    )
    try:
        if r < 0.45:
            n = rng.randint(1, 8)
            score(
                pb.ScoreRequest(items=[_pair(rng, rng.randint(4, 120)) for _ in range(n)]),
                timeout=30,
            )
            return "score OK"
        if r < 0.65:
            seqs = []
            for _ in range(rng.randint(1, 4)):
                ids = [rng.randrange(vocab) for _ in range(rng.randint(8, 120))]
                seqs.append(
                    pb.TokenSequence(token_ids=ids, response_start=rng.randint(1, len(ids) - 1))
                )
            ref = ch.unary_unary(
                "/rlhf.v1.RewardService/ReferenceLogProbs",
                request_serializer=pb.ReferenceLogProbsRequest.SerializeToString,
                response_deserializer=pb.ReferenceLogProbsResponse.FromString,
            )
            ref(pb.ReferenceLogProbsRequest(sequences=seqs, temperature=0.9), timeout=30)
            return "logprobs OK"
        if r < 0.70:
            raw = ch.unary_unary("/rlhf.v1.RewardService/Score")
            raw(rng.randbytes(rng.choice([3, 40, 400])), timeout=10)
            return "malformed OK?"
        if r < 0.75:
            score(
                pb.ScoreRequest(items=[_pair(rng, 2000)], truncation=pb.TRUNCATION_ERROR),
                timeout=10,
            )
            return "oversize OK?"
        if r < 0.79:
            score(
                pb.ScoreRequest(model=f"nope-{rng.randrange(10**6)}", items=[_pair(rng, 5)]),
                timeout=10,
            )
            return "unknown-model OK?"
        if r < 0.80:  # a message over the server's --max-message-mb (4 here)
            raw = ch.unary_unary("/rlhf.v1.RewardService/Score")
            raw(b"\x0a" + b"x" * (5 << 20), timeout=10)
            return "huge OK?"
        if r < 0.87:
            fut = score.future(pb.ScoreRequest(items=[_pair(rng, 100)] * 8), timeout=30)
            time.sleep(rng.random() * 0.01)
            fut.cancel()
            return "cancelled"
        if r < 0.93:
            score(pb.ScoreRequest(items=[_pair(rng, 100)] * 8), timeout=0.002)
            return "deadline OK"
        stream = ch.stream_stream(
            "/rlhf.v1.RewardService/ScoreStream",
            request_serializer=pb.ScoreRequest.SerializeToString,
            response_deserializer=pb.ScoreResponse.FromString,
        )
        call = stream(iter([pb.ScoreRequest(items=[_pair(rng, 30)] * 4)] * 20), timeout=30)
        next(call)
        call.cancel()
        return "stream-abort"
    except grpc.RpcError as err:
        return f"error {err.code().name}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", default="tiny", help="model shape (bench models)")
    p.add_argument("--duration", type=float, default=3600.0, help="seconds of traffic")
    p.add_argument("--warmup", type=float, default=300.0, help="seconds before the baseline")
    p.add_argument("--sample-every", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--server-arg", action="append", default=[], help="extra `serve` flag")
    p.add_argument(
        "--server-env", action="append", default=[], help="KEY=VALUE in the server's environment"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/bench"))


def run(a: argparse.Namespace) -> dict:
    import psutil

    from bench.models import DEFAULT_DIR, build
    from bench.servers import start_reward_server

    reward = build(a.kind, "reward", DEFAULT_DIR)
    reference = build(a.kind, "reference", DEFAULT_DIR)
    sp = start_reward_server(
        "soak",
        ["--reward-model", f"rm={reward}", "--reference-model", f"ref={reference}",
         "--max-input-tokens", "512", "--max-message-mb", "4", *a.server_arg],
        a.out / "logs",
        env=dict(kv.split("=", 1) for kv in a.server_env),
    )  # fmt: skip
    proc = psutil.Process(sp.proc.pid)
    samples: list[dict[str, float]] = []
    outcomes: dict[str, int] = {}
    lock = threading.Lock()
    stop = threading.Event()
    t0 = time.monotonic()

    def client(k: int) -> None:
        rng = random.Random(a.seed * 1000 + k)
        opts = [("grpc.max_send_message_length", 64 << 20)]
        with grpc.insecure_channel(sp.address, options=opts) as ch:
            while not stop.is_set():
                out = one_request(ch, rng, 32000)
                with lock:
                    outcomes[out] = outcomes.get(out, 0) + 1

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(a.clients)]
    for t in threads:
        t.start()
    try:
        while (now := time.monotonic() - t0) < a.duration:
            with proc.oneshot():
                samples.append(
                    {
                        "t": round(now, 1),
                        "rss_mb": round(proc.memory_info().rss / 2**20, 1),
                        "fds": proc.num_fds(),
                        "threads": proc.num_threads(),
                        "requests": sum(outcomes.values()),
                    }
                )
            print(json.dumps(samples[-1]), flush=True)
            time.sleep(min(a.sample_every, max(0.0, a.duration - now)))
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        sp.stop()
    after = [s for s in samples if s["t"] >= a.warmup] or samples[-1:]
    base, last = after[0], samples[-1]

    def mean_rss(xs: list[dict[str, float]]) -> float:
        return sum(x["rss_mb"] for x in xs) / len(xs)

    # growth: the mean of the last 3 samples over the mean of the first 3 after the warm-up
    # (single samples move by a few percent as batches of changing shapes come and go)
    result = {
        "config": {k: str(v) for k, v in vars(a).items() if k != "func"},
        "outcomes": dict(sorted(outcomes.items())),
        "requests": last["requests"],
        "rss_mb_at_warmup_end": base["rss_mb"],
        "rss_mb_end": last["rss_mb"],
        "rss_mb_max_after_warmup": max(s["rss_mb"] for s in after),
        "rss_growth_after_warmup": round(mean_rss(after[-3:]) / mean_rss(after[:3]) - 1, 4),
        "fds_after_warmup": [min(s["fds"] for s in after), max(s["fds"] for s in after)],
        "samples": samples,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    stem = f"soak-{a.kind}-{int(a.duration)}s-{time.strftime('%Y%m%d-%H%M%S')}"
    (a.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    plot(samples, a.warmup, a.out / f"{stem}.png")
    summary = {k: v for k, v in result.items() if k not in ("samples", "config")}
    print(json.dumps(summary, indent=1))
    return result


def plot(samples: list[dict[str, Any]], warmup: float, path: Path) -> None:
    """RSS and open descriptors against time, the end of the warm-up marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] / 60 for s in samples]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(t, [s["rss_mb"] for s in samples], color="tab:blue", label="server RSS (MB)")
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS (MB)", color="tab:blue")
    ax.axvline(warmup / 60, color="grey", linestyle=":", label="end of warm-up")
    ax2 = ax.twinx()
    ax2.plot(t, [s["fds"] for s in samples], color="tab:orange", label="open descriptors")
    ax2.set_ylabel("open file descriptors", color="tab:orange")
    ax2.set_ylim(0, max(s["fds"] for s in samples) * 1.5)
    ax.set_title("bench soak: mixed normal and hostile traffic")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
