"""Closed-loop load on the HTTP/JSON door (`serve --http-port`): the twin of `bench.loadgen` for
`bench compare`'s `http` target, with the same requests as JSON.

`--http-route get_reward` sends OpenRLHF's remote reward-model body (``{"query": [prompt +
completion, ...], "prompts": [...], "labels": [...]}``); `v1/score` sends the ScoreRequest's
JSON mapping. Bodies are encoded once before the run; each client keeps its connection alive (one
aiohttp session, as one gRPC channel on the other side); responses are parsed and checked (one
reward per item) and their token counts summed, like `bench.loadgen`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp
from google.protobuf import json_format

from bench.loadgen import LoadResult, run_window
from reward_server.api.rlhf.v1 import reward_service_pb2 as pb

ROUTES = ("get_reward", "v1/score")


def http_bodies(requests: Sequence[tuple[bytes, int]], route: str) -> list[tuple[bytes, int]]:
    """The serialised ScoreRequests of `bench.loadgen.build_requests` as JSON bodies of `route`."""
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    out = []
    for data, k in requests:
        req = pb.ScoreRequest.FromString(data)
        if route == "get_reward":
            body: dict[str, Any] = {
                "query": [it.prompt + it.completion for it in req.items],
                "prompts": [it.prompt for it in req.items],
                "labels": [""] * k,
            }
        else:
            body = json_format.MessageToDict(req)
        out.append((json.dumps(body).encode(), k))
    return out


def _tokens(route: str, resp: dict, k: int) -> int:
    if route == "get_reward":
        if len(resp["rewards"]) != k:
            raise RuntimeError(f"asked {k} rewards, got {len(resp['rewards'])}")
        return int(sum(resp["extra_logs"]["num_tokens"]))
    if len(resp["scores"]) != k:
        raise RuntimeError(f"asked {k} scores, got {len(resp['scores'])}")
    return sum(s["numTokens"] for s in resp["scores"])


async def _client(
    session: aiohttp.ClientSession,
    url: str,
    route: str,
    bodies: Sequence[tuple[bytes, int]],
    offset: int,
    window: tuple[float, float],
    result: LoadResult,
) -> None:
    start, end = window
    i = offset
    headers = {"Content-Type": "application/json"}
    while True:
        t0 = time.perf_counter()
        if t0 >= end:
            return
        data, k = bodies[i % len(bodies)]
        i += 1
        async with session.post(url, data=data, headers=headers) as r:
            raw = await r.read()
        if r.status != 200:
            result.errors += 1
            await asyncio.sleep(0.01)
            continue
        t1 = time.perf_counter()
        tokens = _tokens(route, json.loads(raw), k)
        if start <= t1 <= end:  # completions in the window (steady-state closed loop)
            result.requests += 1
            result.items += k
            result.real_tokens += tokens
            result.latencies.append(t1 - t0)


async def run_http_load(
    base_url: str,
    route: str,
    bodies: Sequence[tuple[bytes, int]],
    *,
    clients: int,
    duration: float,
    warmup: float = 2.0,
    timeout: float = 600.0,
    on_window: Callable[[str], None] | None = None,
) -> LoadResult:
    """`clients` closed-loop clients posting `bodies` to BASE_URL/ROUTE for warmup + duration
    seconds; the last `duration` seconds are measured (see `bench.loadgen.run_load`)."""
    url = f"{base_url.rstrip('/')}/{route}"
    conn = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(
        connector=conn, timeout=aiohttp.ClientTimeout(total=timeout)
    ) as session:
        now = time.perf_counter()
        window = (now + warmup, now + warmup + duration)
        result = LoadResult(clients, duration)
        step = max(1, len(bodies) // max(1, clients))
        tasks = [
            asyncio.ensure_future(_client(session, url, route, bodies, c * step, window, result))
            for c in range(clients)
        ]
        await run_window(tasks, window, on_window)
    return result


def load_http(
    base_url: str, route: str, bodies: Sequence[tuple[bytes, int]], **kw: Any
) -> LoadResult:
    """Blocking wrapper of `run_http_load`."""
    return asyncio.run(run_http_load(base_url, route, bodies, **kw))
