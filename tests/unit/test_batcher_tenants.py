"""Fair sharing between tenants in the batcher, with a fake forward (no gRPC, no torch)."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from reward_server.engine.batcher import DynamicBatcher, plan_window
from reward_server.errors import ResourceExhausted


class Recorder:
    """A fake forward recording each batch's payloads ``(tenant, index, length)``."""

    def __init__(self, delay: float = 0.0, gate: threading.Event | None = None) -> None:
        self.batches: list[list[tuple[str, int, int]]] = []
        self.delay, self.gate = delay, gate
        self.lock = threading.Lock()

    def __call__(self, payloads: list[tuple[str, int, int]]) -> list[int]:
        if self.gate is not None:
            self.gate.wait(5)
        time.sleep(self.delay)
        with self.lock:
            self.batches.append(list(payloads))
        return [p[1] for p in payloads]


def make(model: Recorder, **kw) -> DynamicBatcher:
    opts = dict(max_batch_tokens=256, max_batch_items=16, max_wait_ms=0, max_queue_items=10_000)
    opts.update(kw)
    return DynamicBatcher("m", model, ThreadPoolExecutor(1), **opts)


def _items(tenant: str, n: int, rng: random.Random, lo: int = 8, hi: int = 32):
    return [(tenant, i, rng.randint(lo, hi)) for i in range(n)]


async def _flood(b: DynamicBatcher, items_by_tenant: dict[str, list]) -> list:
    """Queue every item (one request each) before the batcher starts, then run them all."""
    tasks = [
        asyncio.ensure_future(b.submit([it], [it[2]], tenant=t))
        for t, items in items_by_tenant.items()
        for it in items
    ]
    await asyncio.sleep(0)  # every submit has queued its item
    b.start()
    outs = await asyncio.gather(*tasks)
    await b.stop()
    return outs


@pytest.mark.parametrize("shares", [{"a": 3.0, "b": 1.0}, {"a": 1.0, "b": 1.0}, {"b": 2.0}])
def test_backlogged_tenants_get_tokens_in_proportion_to_their_shares(shares):
    rng = random.Random(0)
    items = {"a": _items("a", 600, rng), "b": _items("b", 600, rng)}
    model = Recorder()
    outs = asyncio.run(_flood(make(model, tenant_shares=shares), items))
    assert [o.results for o in outs] == [[it[1]] for t in items for it in items[t]]
    # tokens per tenant while both are still backlogged: the first half of all tokens served
    total = sum(it[2] for t in items for it in items[t])
    served = {"a": 0, "b": 0}
    for batch in model.batches:
        if sum(served.values()) >= total / 2:
            break
        for t, _, n in batch:
            served[t] += n
    want = shares.get("a", 1.0) / shares.get("b", 1.0)
    assert served["a"] / served["b"] == pytest.approx(want, rel=0.1)


def test_a_light_tenant_is_not_starved_by_a_flood():
    """A tenant with one long item, behind another tenant's 500 short ones queued earlier, is
    forwarded in one of the first two batches; with one shared queue it would wait for them."""
    rng = random.Random(1)
    heavy = _items("heavy", 500, rng, 8, 12)
    model = Recorder()
    b = make(model)

    async def main() -> None:
        tasks = [asyncio.ensure_future(b.submit([it], [it[2]], tenant="heavy")) for it in heavy]
        await asyncio.sleep(0)
        light = asyncio.ensure_future(b.submit([("light", 0, 200)], [200], tenant="light"))
        await asyncio.sleep(0)
        b.start()
        await asyncio.gather(light, *tasks)
        await b.stop()

    asyncio.run(main())
    first = next(k for k, batch in enumerate(model.batches) if batch[0][0] == "light")
    assert first <= 1
    assert sum(len(x) for x in model.batches) == 501
    assert not b._queued and not b._deficit  # no state left for idle tenants


def test_every_tenant_anchors_in_turn_and_batches_mix_tenants():
    """Three backlogged tenants: within any three consecutive batches each tenant's oldest item
    anchors one, and batches still fill across tenants by length."""
    rng = random.Random(2)
    items = {t: _items(t, 200, rng, 16, 16) for t in ("x", "y", "z")}
    model = Recorder()
    asyncio.run(_flood(make(model), items))
    mixed = sum(len({p[0] for p in batch}) > 1 for batch in model.batches)
    assert mixed >= len(model.batches) // 2
    for k in range(0, 30):
        window = model.batches[k : k + 3]
        assert {p[0] for batch in window for p in batch} == {"x", "y", "z"}


def test_one_tenant_forms_exactly_the_batches_of_the_shared_queue():
    """With one tenant the batcher is the one-queue batcher: each batch is `plan_window` over
    the whole queue around its oldest item, whatever the tenant's name."""
    rng = random.Random(3)
    lengths = [rng.randint(4, 120) for _ in range(300)]

    def expected() -> list[list[int]]:
        remaining = list(range(len(lengths)))
        out = []
        while remaining:
            sub = [lengths[i] for i in remaining]
            w = plan_window(sub, anchor=0, max_tokens=256, max_items=16)
            out.append(sorted(remaining[i] for i in w))
            remaining = [r for k, r in enumerate(remaining) if k not in set(w)]
        return out

    for tenant in ("default", "job-7"):
        model = Recorder()
        items = {tenant: [(tenant, i, n) for i, n in enumerate(lengths)]}
        asyncio.run(_flood(make(model), items))
        assert [sorted(p[1] for p in batch) for batch in model.batches] == expected()


def test_quota_refuses_only_the_tenant_over_it():
    gate = threading.Event()
    model = Recorder(gate=gate)
    b = make(model, tenant_max_queued_items=4, tenant_quotas={"vip": 0, "small": 1})

    async def main() -> None:
        b.start()
        busy = asyncio.ensure_future(b.submit([("a", 0, 5)], [5], tenant="a"))
        await asyncio.sleep(0.05)  # in the forward, held by the gate
        queued = [asyncio.ensure_future(b.submit([("a", i, 5)], [5], tenant="a")) for i in range(4)]
        await asyncio.sleep(0)
        with pytest.raises(ResourceExhausted, match="tenant 'a' has 4 item"):
            await b.submit([("a", 9, 5)], [5], tenant="a")
        others = [asyncio.ensure_future(b.submit([("b", i, 5)], [5], tenant="b")) for i in range(4)]
        vip = asyncio.ensure_future(
            b.submit([("vip", i, 5) for i in range(8)], [5] * 8, tenant="vip")
        )
        small = asyncio.ensure_future(b.submit([("small", 0, 5)], [5], tenant="small"))
        await asyncio.sleep(0)
        with pytest.raises(ResourceExhausted, match="quota of 1"):
            await b.submit([("small", 1, 5)], [5], tenant="small")
        gate.set()
        for f in (busy, *queued, *others, vip, small):
            await f
        assert (await b.submit([("a", 5, 5)], [5], tenant="a")).results == [5]
        await b.stop()

    asyncio.run(main())


class TenantObserver:
    """Records the per-tenant reports of the batcher."""

    def __init__(self) -> None:
        self.tokens: dict[str, int] = {}
        self.items: dict[str, int] = {}
        self.waits: dict[str, int] = {}

    def on_batch(self, *a) -> None: ...
    def on_queue_time(self, *a) -> None: ...
    def on_queue_depth(self, *a) -> None: ...
    def on_dropped(self, *a) -> None: ...

    def on_tenant_batch(self, model, tenant, items, real_tokens, queue_seconds) -> None:
        self.tokens[tenant] = self.tokens.get(tenant, 0) + real_tokens
        self.items[tenant] = self.items.get(tenant, 0) + items
        self.waits[tenant] = self.waits.get(tenant, 0) + len(queue_seconds)
        assert all(s >= 0 for s in queue_seconds)


def test_per_tenant_reports_count_every_item_and_token():
    rng = random.Random(4)
    items = {"a": _items("a", 50, rng), "b": _items("b", 20, rng)}
    obs = TenantObserver()
    asyncio.run(_flood(make(Recorder(), observer=obs), items))
    for t, its in items.items():
        assert obs.tokens[t] == sum(it[2] for it in its)
        assert obs.items[t] == obs.waits[t] == len(its)


def test_closed_loop_tenants_follow_their_shares():
    """Two tenants of 16 closed-loop clients each (a client sends its next request when the last
    is answered, as training jobs do), shares 3:1: their tokens follow 3:1, although both
    backlogs are about the size of the batcher's eligible pool."""
    rng = random.Random(5)
    model = Recorder(delay=0.001)
    b = make(model, max_batch_tokens=512, tenant_shares={"a": 3})
    served = {"a": 0, "b": 0}

    async def client(tenant: str, stop: asyncio.Event) -> None:
        while not stop.is_set():
            items = _items(tenant, rng.randint(1, 4), rng, 16, 64)
            await b.submit(items, [it[2] for it in items], tenant=tenant)
            if not stop.is_set():
                served[tenant] += sum(it[2] for it in items)

    async def main() -> None:
        b.start()
        stop = asyncio.Event()
        tasks = [asyncio.ensure_future(client(t, stop)) for t in ("a", "b") for _ in range(16)]
        await asyncio.sleep(0.3)  # warm-up
        base = dict(served)
        await asyncio.sleep(1.5)
        window = {t: served[t] - base[t] for t in served}
        stop.set()
        await asyncio.gather(*tasks)
        await b.stop()
        assert window["a"] / window["b"] == pytest.approx(3.0, rel=0.15)

    asyncio.run(main())


# ---------------------------------------------------------------------- the fast lane
class Gated:
    """A fake forward whose batches holding an item of `held` block until `release` is set;
    records each batch with the thread that ran it."""

    def __init__(self, held: str = "heavy") -> None:
        self.held, self.release = held, threading.Event()
        self.batches: list[tuple[str, list[tuple[str, int, int]]]] = []
        self.lock = threading.Lock()

    def __call__(self, payloads: list[tuple[str, int, int]]) -> list[int]:
        if any(p[0] == self.held for p in payloads):
            self.release.wait(5)
        with self.lock:
            self.batches.append((threading.current_thread().name, list(payloads)))
        return [p[1] for p in payloads]


async def _light_beside_a_held_forward(b: DynamicBatcher, model: Gated, light: str) -> bool:
    """Heavy items fill the (held) forward and the queue; then one item of `light` arrives.
    Returns whether it was answered while the heavy forward was still held."""
    b.start()
    rng = random.Random(6)
    heavy = [
        asyncio.ensure_future(b.submit([it], [it[2]], tenant="heavy"))
        for it in _items("heavy", 40, rng)
    ]
    await asyncio.sleep(0.05)  # the first heavy batch is in the held forward
    lone = asyncio.ensure_future(b.submit([(light, 0, 20)], [20], tenant=light))
    try:
        await asyncio.wait_for(asyncio.shield(lone), 1.0)
        answered = True
    except asyncio.TimeoutError:
        answered = False
    model.release.set()
    await asyncio.gather(lone, *heavy)
    await b.stop()
    return answered


def test_a_light_tenant_does_not_wait_for_a_running_forward():
    """While a heavy tenant's forward holds the only stream, a light tenant's lone request is
    answered on the fast lane without waiting for it; its batch stays small (its item plus at
    most a forward's fixed cost of the heavy tenant's items)."""
    model = Gated()
    b = make(model)
    b.overhead_tokens = 12.0
    assert asyncio.run(_light_beside_a_held_forward(b, model, "light"))
    lane = [batch for thread, batch in model.batches if thread.startswith("lane-")]
    assert ("light", 0, 20) in lane[0]
    assert len(lane[0]) * max(p[2] for p in lane[0]) <= 20 + 12
    assert all(p[0] == "light" or p[2] <= 20 for p in lane[0])
    assert sum(len(batch) for _, batch in model.batches) == 41
    assert not b._inflight_tenants and not b._lane_busy and b._lane_executor is None


def test_no_fast_lane_for_one_tenant_or_when_turned_off():
    """The same request of the heavy tenant itself, or of another tenant with the lane turned
    off, waits for the running forward (the one-queue batcher's behaviour)."""
    model = Gated()
    assert not asyncio.run(_light_beside_a_held_forward(make(model), model, "heavy"))
    model = Gated()
    b = make(model, tenant_fast_lane=False)
    assert not asyncio.run(_light_beside_a_held_forward(b, model, "light"))
    assert not any(thread.startswith("lane-") for thread, _ in model.batches)


def test_a_batch_anchored_on_a_light_tenant_is_not_filled_with_others_items():
    """With the lane off, a light tenant queued behind a heavy flood anchors the second batch;
    with no fixed cost measured (the budget-filling setting) that batch stays within a quarter
    of the budget instead of being filled to the full budget with the heavy tenant's items."""
    rng = random.Random(7)
    items = {"heavy": _items("heavy", 300, rng, 8, 32), "light": [("light", 0, 60)]}
    model = Recorder()
    asyncio.run(_flood(make(model, tenant_fast_lane=False), items))
    k = next(k for k, batch in enumerate(model.batches) if ("light", 0, 60) in batch)
    assert k == 1
    assert model.batches[k] == [("light", 0, 60)]  # 2 x 60 > 256 / 4
    assert all(len(x) * max(p[2] for p in x) > 128 for x in model.batches[2:10])


def test_a_tenant_over_its_fair_share_leaves_the_fast_lane():
    """Tenant `a` (share 3, 12 closed-loop clients, backlogged) beside `b` (share 1, one client
    of one short item at a time: never backlogged, light by its queue). Forwards cost in
    proportion to their padded tokens. Short batches anchored on `b` as soon as it asks would
    give it nearly half the tokens (0.48 measured without the fair-share rule), but once its
    recent tokens reach its fair share it is no longer light and its items go into full batches
    in turn: `b` gets at most about its quarter."""
    rng = random.Random(8)
    model = Recorder()

    def forward(payloads):
        time.sleep(2e-5 * len(payloads) * max(p[2] for p in payloads))
        return model(payloads)

    b = make(forward, max_batch_tokens=512, tenant_shares={"a": 3})
    served = {"a": 0, "b": 0}

    async def client(tenant: str, n: int, lo: int, hi: int, stop: asyncio.Event) -> None:
        while not stop.is_set():
            items = _items(tenant, n, rng, lo, hi)
            await b.submit(items, [it[2] for it in items], tenant=tenant)
            if not stop.is_set():
                served[tenant] += sum(it[2] for it in items)

    async def main() -> float:
        b.start()
        stop = asyncio.Event()
        tasks = [asyncio.ensure_future(client("a", 4, 32, 64, stop)) for _ in range(12)]
        tasks.append(asyncio.ensure_future(client("b", 1, 32, 64, stop)))
        await asyncio.sleep(0.3)
        base = dict(served)
        await asyncio.sleep(1.5)
        window = {t: served[t] - base[t] for t in served}
        stop.set()
        await asyncio.gather(*tasks)
        await b.stop()
        return window["b"] / (window["a"] + window["b"])

    share_b = asyncio.run(main())
    assert 0.05 < share_b <= 0.3
