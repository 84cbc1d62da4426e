"""The batcher's logic with a fake model (no gRPC, no torch)."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from reward_server.engine.batcher import DynamicBatcher, plan_window
from reward_server.errors import DeadlineExceeded, ResourceExhausted, Unavailable


def test_plan_window_respects_budget_and_cap():
    lengths = [10, 200, 12, 11, 190, 13]
    w = plan_window(lengths, anchor=0, max_tokens=60, max_items=8)
    assert 0 in w
    assert max(lengths[i] for i in w) * len(w) <= 60
    assert sorted(w) == [0, 2, 3, 5][: len(w)] or set(w) <= {0, 2, 3, 5}
    assert len(w) == 4  # 4 x 13 = 52 fits, the 190s do not
    w = plan_window(lengths, anchor=0, max_tokens=10_000, max_items=3)
    assert len(w) == 3 and 0 in w


def test_plan_window_single_oversize_item_still_runs():
    assert plan_window([5000, 10], anchor=0, max_tokens=100, max_items=4) == [0]


def test_plan_window_padding_efficiency_beats_arrival_order():
    rng = random.Random(0)
    lengths = [rng.randint(16, 256) for _ in range(400)]
    budget, cap = 2048, 64

    def efficiency(batches: list[list[int]]) -> float:
        real = sum(lengths[i] for b in batches for i in b)
        padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
        return real / padded

    remaining = list(range(len(lengths)))
    sorted_batches = []
    while remaining:
        sub = [lengths[i] for i in remaining]
        w = plan_window(sub, anchor=0, max_tokens=budget, max_items=cap)
        sorted_batches.append([remaining[i] for i in w])
        remaining = [r for k, r in enumerate(remaining) if k not in set(w)]
    arrival, cur = [], []
    for i in range(len(lengths)):  # arrival order under the same budget
        if cur and max(lengths[j] for j in [*cur, i]) * (len(cur) + 1) > budget:
            arrival.append(cur)
            cur = []
        cur.append(i)
    arrival.append(cur)
    assert efficiency(sorted_batches) >= 0.9
    assert efficiency(arrival) < 0.75


class FakeModel:
    """Records batches; optional per-call sleep."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.delay = delay
        self.lock = threading.Lock()

    def __call__(self, payloads: list[int]) -> list[int]:
        time.sleep(self.delay)
        with self.lock:
            self.batches.append(list(payloads))
        return [p * 10 for p in payloads]


def make(model: FakeModel, **kw) -> DynamicBatcher:
    opts = dict(max_batch_tokens=1000, max_batch_items=16, max_wait_ms=20, max_queue_items=64)
    opts.update(kw)
    return DynamicBatcher("m", model, ThreadPoolExecutor(1), **opts)


def test_concurrent_submits_are_merged_and_answered_in_order():
    async def main() -> None:
        model = FakeModel()
        b = make(model)
        b.start()
        outs = await asyncio.gather(*(b.submit([i, i + 100], [5, 6]) for i in range(8)))
        for i, o in enumerate(outs):
            assert o.results == [i * 10, (i + 100) * 10]
        assert len(model.batches) < 8  # merged
        assert sum(len(x) for x in model.batches) == 16
        await b.stop()

    asyncio.run(main())


def test_queue_full_is_resource_exhausted():
    async def main() -> None:
        model = FakeModel(delay=0.2)
        b = make(model, max_queue_items=4, max_batch_items=2, max_wait_ms=0)
        b.start()
        first = asyncio.ensure_future(b.submit([1, 2], [1, 1]))
        await asyncio.sleep(0.05)  # running
        second = asyncio.ensure_future(b.submit([3, 4, 5, 6], [1, 1, 1, 1]))
        await asyncio.sleep(0.01)
        with pytest.raises(ResourceExhausted):
            await b.submit([7], [1])
        assert (await first).results == [10, 20]
        assert (await second).results == [30, 40, 50, 60]
        await b.stop()

    asyncio.run(main())


def test_expired_and_cancelled_items_never_reach_the_model():
    async def main() -> None:
        model = FakeModel(delay=0.2)
        b = make(model, max_batch_items=1, max_wait_ms=0)
        b.start()
        busy = asyncio.ensure_future(b.submit([1], [1]))
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(b.submit([3], [1]))
        await asyncio.sleep(0.01)
        gone.cancel()  # the client went away while its item was queued
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await b.submit([2], [1], deadline=time.monotonic() + 0.05)
        assert time.monotonic() - t0 < 0.15  # answered at the deadline, not when the model frees
        await busy
        ok = await b.submit([4], [1])
        assert ok.results == [40]
        assert [p for batch in model.batches for p in batch] == [1, 4]
        await b.stop()

    asyncio.run(main())


def test_waits_for_fuller_batch_at_most_max_wait():
    async def main() -> None:
        model = FakeModel()
        b = make(model, max_wait_ms=50)
        b.start()
        t0 = time.monotonic()
        await b.submit([1], [3])
        waited = time.monotonic() - t0
        assert 0.04 <= waited < 0.5
        await b.stop()

    asyncio.run(main())


def test_model_error_fails_only_that_batch_and_close_refuses_new_work():
    async def main() -> None:
        calls = {"n": 0}

        def flaky(payloads: list[int]) -> list[int]:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("device failure")
            return payloads

        b = DynamicBatcher(
            "m",
            flaky,
            ThreadPoolExecutor(1),
            max_batch_tokens=100,
            max_batch_items=4,
            max_wait_ms=0,
            max_queue_items=8,
        )
        b.start()
        with pytest.raises(RuntimeError):
            await b.submit([1], [1])
        assert (await b.submit([2], [1])).results == [2]
        b.close()
        with pytest.raises(Unavailable):
            await b.submit([3], [1])
        await b.stop()

    asyncio.run(main())


@pytest.mark.parametrize("streams", [1, 2, 3])
def test_forward_streams_bound_the_forwards_running_at_once(streams):
    """With N streams the batcher keeps up to N batches in the model at once, never more, and
    every item still gets its own result."""
    lock, running, peak = threading.Lock(), [0], [0]

    def run_batch(payloads):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return [p * 10 for p in payloads]

    async def main() -> list[list[int]]:
        b = DynamicBatcher(
            "m",
            run_batch,
            ThreadPoolExecutor(streams),
            max_batch_tokens=1000,
            max_batch_items=2,  # 12 one-item requests: at least 6 batches
            max_wait_ms=0,
            max_queue_items=64,
            max_inflight=streams,
        )
        b.start()
        outs = await asyncio.gather(*(b.submit([i], [5]) for i in range(12)))
        await b.stop()
        assert b._inflight == 0
        return [o.results for o in outs]

    results = asyncio.run(main())
    assert results == [[i * 10] for i in range(12)]
    assert peak[0] == streams
