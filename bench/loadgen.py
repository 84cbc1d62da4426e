"""Closed-loop asyncio load generator: N concurrent clients, each sending its next request as soon
as the last one answers.

Requests are serialised once before the run and sent as bytes on a raw unary-unary method, so the
generator's own CPU cost stays small (it shares the machine with the server); responses are parsed
and checked (one score per item). Requests that complete inside the measured window count (a closed
loop in steady state: completions per second are the throughput); the window opens after a
warm-up.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from bench.workload import RequestShape
from reward_server.api.rlhf.v1 import reward_service_pb2 as pb
from reward_server.client.messages import score_items

SCORE_METHOD = "/rlhf.v1.RewardService/Score"
SCORE_STREAM_METHOD = "/rlhf.v1.RewardService/ScoreStream"


@dataclass
class LoadResult:
    """What one load run measured (client side)."""

    clients: int
    """Concurrent clients."""
    seconds: float
    """Length of the measured window."""
    requests: int = 0
    """Requests completed in the window."""
    items: int = 0
    """Items scored in the window."""
    real_tokens: int = 0
    """Unpadded tokens of those items (as the server counted them)."""
    errors: int = 0
    """Failed requests (any status)."""
    latencies: list[float] = field(default_factory=list)
    """Seconds per request, send to answer."""

    @property
    def tokens_per_s(self) -> float:
        return self.real_tokens / self.seconds

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds

    def latency_ms(self, q: float) -> float:
        """Latency quantile (0..100) in milliseconds."""
        return float(np.percentile(self.latencies, q) * 1e3) if self.latencies else float("nan")

    def summary(self) -> dict:
        return {
            "clients": self.clients,
            "seconds": round(self.seconds, 2),
            "requests": self.requests,
            "items": self.items,
            "real_tokens": self.real_tokens,
            "errors": self.errors,
            "tokens_per_s": round(self.tokens_per_s, 1),
            "items_per_s": round(self.items_per_s, 2),
            "p50_ms": round(self.latency_ms(50), 2),
            "p90_ms": round(self.latency_ms(90), 2),
            "p99_ms": round(self.latency_ms(99), 2),
        }


def build_requests(
    pairs: Sequence[tuple[str, str]],
    shape: RequestShape,
    n_requests: int,
    seed: int = 0,
    model: str = "",
    token_in: tuple[Callable[[list[str]], list[list[int]]], str] | None = None,
) -> list[tuple[bytes, int]]:
    """Serialised ScoreRequests drawn from `pairs`, with their item counts. With `token_in`
    (an encode function, texts -> ids, and the tokenizer's fingerprint) the same items go as
    token ids (token-in scoring), tokenised here once, before the run."""
    rng = random.Random(seed)
    pool = list(pairs)
    ids_of: dict[tuple[str, str], list[int]] = {}
    if token_in is not None:
        encode, fingerprint = token_in
        ids_of = dict(zip(pool, encode([p + c for p, c in pool]), strict=True))
    out = []
    for _ in range(n_requests):
        k = rng.randint(shape.lo, shape.hi)
        chosen = rng.sample(pool, k)
        if token_in is None:
            req = pb.ScoreRequest(model=model, items=score_items(chosen))
        else:
            items = [pb.ScoreItem(token_ids=ids_of[pc]) for pc in chosen]
            req = pb.ScoreRequest(model=model, items=items, tokenizer_fingerprint=fingerprint)
        out.append((req.SerializeToString(), k))
    return out


async def client_loop(
    call: Callable[[bytes], Any],
    requests: Sequence[tuple[bytes, int]],
    offset: int,
    window: tuple[float, float],
    result: LoadResult,
) -> None:
    """One closed-loop client: send the next of `requests` (from `offset`) as soon as the last
    answers (`call` sends one: a unary call, or a request on a stream); record the completions
    inside `window`."""
    start, end = window
    i = offset
    while True:
        t0 = time.perf_counter()
        if t0 >= end:
            return
        data, k = requests[i % len(requests)]
        i += 1
        try:
            raw = await call(data)
        except grpc.aio.AioRpcError:
            result.errors += 1
            await asyncio.sleep(0.01)
            continue
        t1 = time.perf_counter()
        resp = pb.ScoreResponse.FromString(raw)
        if resp.HasField("status") or len(resp.scores) != k:
            raise RuntimeError(f"asked {k} scores, got {len(resp.scores)}: {resp.status}")
        if start <= t1 <= end:  # completions in the window (steady-state closed loop)
            result.requests += 1
            result.items += k
            result.real_tokens += sum(s.num_tokens for s in resp.scores)
            result.latencies.append(t1 - t0)


def _unary(channel: grpc.aio.Channel, timeout: float) -> Callable[[bytes], Any]:
    call = channel.unary_unary(SCORE_METHOD)  # bytes in, bytes out
    return lambda data: call(data, timeout=timeout)


def _on_stream(channel: grpc.aio.Channel, timeout: float) -> Callable[[bytes], Any]:
    """One ScoreStream for this client: each request is written and its response read before the
    next (the stream answers in request order)."""
    stream = channel.stream_stream(SCORE_STREAM_METHOD)(timeout=timeout)

    async def call(data: bytes) -> bytes:
        await stream.write(data)
        raw = await stream.read()
        if raw is grpc.aio.EOF:
            raise RuntimeError("ScoreStream ended early")
        return raw

    return call


async def run_load(
    address: str,
    requests: Sequence[tuple[bytes, int]],
    *,
    clients: int,
    duration: float,
    warmup: float = 2.0,
    timeout: float = 600.0,
    on_window: Callable[[str], None] | None = None,
    stream: bool = False,
) -> LoadResult:
    """Run `clients` closed-loop clients for warmup + duration seconds; measure the last part.

    `on_window("start")` and `on_window("end")` run (in a thread) when the window opens and
    closes, e.g. to scrape the server's metrics. Requests still running at the end are cancelled.
    With `stream`, each client sends its requests one at a time over its own ScoreStream
    instead of one Score call each.
    """
    opts = [
        ("grpc.max_receive_message_length", 64 << 20),
        ("grpc.max_send_message_length", 64 << 20),
    ]
    async with grpc.aio.insecure_channel(address, options=opts) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        opener = _on_stream if stream else _unary
        now = time.perf_counter()
        window = (now + warmup, now + warmup + duration)
        result = LoadResult(clients, duration)
        step = max(1, len(requests) // max(1, clients))
        tasks = [
            asyncio.ensure_future(
                client_loop(opener(channel, timeout), requests, c * step, window, result)
            )
            for c in range(clients)
        ]
        await run_window(tasks, window, on_window)
    return result


async def run_window(
    tasks: list[asyncio.Future],
    window: tuple[float, float],
    on_window: Callable[[str], None] | None,
) -> None:
    """Let the client `tasks` run until the window ends (``on_window("start")`` and ``("end")``
    at its edges, off the loop), then stop them; a client's own error is raised."""
    await asyncio.sleep(max(0.0, window[0] - time.perf_counter()))
    if on_window:
        await asyncio.to_thread(on_window, "start")
    await asyncio.sleep(max(0.0, window[1] - time.perf_counter()))
    if on_window:
        await asyncio.to_thread(on_window, "end")
    for t in tasks:
        t.cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    for d in done:
        if isinstance(d, Exception) and not isinstance(d, asyncio.CancelledError):
            raise d


def load(address: str, requests: Sequence[tuple[bytes, int]], **kw: Any) -> LoadResult:
    """Blocking wrapper of `run_load`."""
    return asyncio.run(run_load(address, requests, **kw))
