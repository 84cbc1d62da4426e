"""The batcher skips its max_wait when requests keep finding it idle (one sequential client), and
keeps it under load (no gRPC, no torch)."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from reward_server.engine.batcher import DynamicBatcher


def make(
    max_wait_ms: float = 50, skip: bool = True, forwards: list[int] | None = None
) -> DynamicBatcher:
    """A batcher over an echo model; each forward appends its batch size to `forwards`."""
    sizes = [] if forwards is None else forwards

    def echo(payloads: list[int]) -> list[int]:
        sizes.append(len(payloads))
        return list(payloads)

    return DynamicBatcher(
        "m",
        echo,
        ThreadPoolExecutor(1),
        max_batch_tokens=1000,
        max_batch_items=16,
        max_wait_ms=max_wait_ms,
        max_queue_items=64,
        skip_wait_when_idle=skip,
    )


def sequential_waits(skip: bool) -> list[float]:
    async def main() -> list[float]:
        b = make(skip=skip)
        b.start()
        waits = []
        for i in range(6):
            t0 = time.monotonic()
            await b.submit([i], [3])
            waits.append(time.monotonic() - t0)
            await asyncio.sleep(0.15)  # the client thinks: each request finds the batcher idle
        await b.stop()
        return waits

    return asyncio.run(main())


def test_one_sequential_client_stops_paying_max_wait():
    waits = sequential_waits(skip=True)
    assert waits[0] >= 0.04  # no history yet: waits for company
    assert all(w < 0.03 for w in waits[2:]), waits


def test_skip_wait_when_idle_off_always_waits():
    waits = sequential_waits(skip=False)
    assert all(w >= 0.045 for w in waits), waits


def test_concurrent_clients_still_wait_and_merge():
    sizes: list[int] = []

    async def main() -> list[int]:
        b = make(forwards=sizes)
        b.start()
        for _ in range(3):  # a sequential history first: the estimate says "alone"
            await b.submit([0], [3])
            await asyncio.sleep(0.15)
        before = len(sizes)

        async def client(i: int) -> None:
            for _ in range(5):
                await b.submit([i], [3])

        await asyncio.gather(*(client(i) for i in range(8)))
        await b.stop()
        return sizes[before:]

    batches = asyncio.run(main())
    assert sum(batches) == 40
    assert len(batches) <= 20  # 40 items from 8 concurrent clients: merged, not one forward each
