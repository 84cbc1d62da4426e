"""Dynamic batcher: one per model. Knows nothing of gRPC or tensors.

Requests from all clients are split into items and queued. When the device is free the batcher
forms one batch under a padded-token budget (``items x longest item <= max_batch_tokens``) and an
item cap: it sorts the queue by length and grows a window around the oldest item (so nothing
starves), each step taking the neighbour that keeps padding efficiency (real / padded tokens)
highest. It waits at most ``max_wait_ms`` after the oldest arrival for a fuller batch (not at
all when nearly every recent request found the model idle: one sequential client). The queue is
bounded (ResourceExhausted when full). Items whose client has gone or whose deadline passed are
dropped before the forward. The forward runs in an executor (one worker thread per device, or
``max_inflight`` of them: forward streams) so the event loop keeps accepting; with several streams
the batcher forms the next batch while the others run.

Tenants (the callers' identities, `serve/tenants.py`) share the batcher fairly: deficit round
robin (Shreedhar & Varghese, "Efficient fair queueing using deficit round robin", SIGCOMM 1995)
over per-tenant queues, counting tokens and weighted by each tenant's share, adapted to batches
(`_fair_window`). With one tenant queued the batcher works exactly as above. A *light* tenant
(nothing in a forward, a few items queued, fewer recent tokens than its fair share: `_light`)
is not made to wait for the others: a batch anchored on it takes little beyond its own items
(`_light_budget`), and while every forward stream is busy its items run at once on a fast lane,
one extra forward on a thread of the batcher's own (`_lane_window`). Peers bound how long short
work waits on long work by bounding each step (vLLM's chunked prefill caps the tokens of one
step, `max_num_batched_tokens`:
https://docs.vllm.ai/en/latest/configuration/optimization.html); a reward forward cannot be split
without changing the models, and capping every batch costs a CPU much of its throughput
(docs/BENCHMARKS.md, tenants), so the short work runs beside the long instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from reward_server.errors import DeadlineExceeded, ResourceExhausted, ServiceError, Unavailable

log = logging.getLogger(__name__)
DEFAULT_TENANT = "default"
"""The tenant of requests that name none (auth off and no ``tenant`` metadata)."""
RECENT_HALF_LIFE_BATCHES = 8
"""The tokens forwarded for each tenant decay by half per this many batch budgets of tokens
forwarded in all (`DynamicBatcher._account`): the window over which a tenant's recent share is
compared with its fair share (`DynamicBatcher._light`)."""
FAIR_POOL_BATCHES = 2
"""With several tenants queued, the batch budgets' worth of eligible items a batch is chosen
from (`DynamicBatcher._fair_window`). More would mean more choice and tighter batches, but once
the pool nears the tenants' backlogs the batches follow the backlogs, not the shares (8 gave
1.7:1 for shares 3:1 in `bench tenants`, docs/BENCHMARKS.md)."""


class BatchObserver(Protocol):
    """Receives what the batcher measures (the metrics module implements it)."""

    def on_batch(
        self, model: str, items: int, real_tokens: int, padded_tokens: int, seconds: float
    ) -> None: ...
    def on_queue_time(self, model: str, seconds: float) -> None: ...
    def on_queue_depth(self, model: str, depth: int) -> None: ...
    def on_dropped(self, model: str, reason: str, count: int) -> None: ...
    def on_tenant_batch(
        self, model: str, tenant: str, items: int, real_tokens: int, queue_seconds: list[float]
    ) -> None: ...


class _NullObserver:
    def on_batch(self, *a: Any) -> None: ...
    def on_queue_time(self, *a: Any) -> None: ...
    def on_queue_depth(self, *a: Any) -> None: ...
    def on_dropped(self, *a: Any) -> None: ...
    def on_tenant_batch(self, *a: Any) -> None: ...


@dataclass
class _Pending:
    payload: Any
    length: int
    future: asyncio.Future
    enqueued: float
    deadline: float | None
    seq: int = field(default=0)
    tenant: str = DEFAULT_TENANT


@dataclass
class Submitted:
    """Results of one submit, in order, with the slowest item's queue and batch time."""

    results: list[Any]
    queue_seconds: float
    inference_seconds: float


def plan_window(
    lengths: Sequence[int],
    anchor: int,
    max_tokens: int,
    max_items: int,
    overhead_tokens: float = math.inf,
) -> list[int]:
    """Indices of the batch to run: a window in length order around `anchor`.

    Pure function (unit-tested). The padded cost of a window is ``count * max(length)``; each
    step adds the shorter or the longer neighbour, whichever leaves the higher efficiency, while
    the cost fits `max_tokens` and the count fits `max_items`.

    `overhead_tokens` is the fixed cost of one forward expressed in tokens (``c0 / c1`` for a
    forward taking ``c0 + c1 * padded_tokens`` seconds; measured at warm-up). A neighbour joins
    only when the padding it adds now costs no more than its share of a forward's overhead,
    which is what it would cost in a later batch: for a batch of n items with longest L, a
    shorter item l joins when ``L - l <= overhead / (n + 1)``, a longer one when
    ``n * (l - L) <= overhead / (n + 1)``. Infinite overhead (the default) fills the budget;
    on a CPU, where a forward costs little beyond its tokens, batches stay short and tight.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    pos = order.index(anchor)
    lo = hi = pos
    longest = real = lengths[anchor]
    count = 1
    while count < max_items:
        best: tuple[float, str] | None = None
        share = overhead_tokens / (count + 1)  # this item's share of one forward's overhead
        if lo > 0:
            cost = longest * (count + 1)
            short = lengths[order[lo - 1]]
            if cost <= max_tokens and longest - short <= share:
                best = ((real + short) / cost, "l")
        if hi + 1 < len(order):
            new_len = lengths[order[hi + 1]]
            cost = new_len * (count + 1)
            if cost <= max_tokens and count * (new_len - longest) <= share:
                eff = (real + new_len) / cost
                if best is None or eff > best[0]:
                    best = (eff, "r")
        if best is None:
            break
        if best[1] == "l":
            lo -= 1
            real += lengths[order[lo]]
        else:
            hi += 1
            longest = lengths[order[hi]]
            real += longest
        count += 1
    return order[lo : hi + 1]


class DynamicBatcher:
    """Batches items of one model; `submit` is called from request handlers on the event loop."""

    def __init__(
        self,
        name: str,
        run_batch: Callable[[list[Any]], list[Any]],
        executor: Executor,
        *,
        max_batch_tokens: int,
        max_batch_items: int,
        max_wait_ms: float,
        max_queue_items: int,
        observer: BatchObserver | None = None,
        skip_wait_when_idle: bool = True,
        max_inflight: int = 1,
        tenant_shares: Mapping[str, float] | None = None,
        tenant_max_queued_items: int = 0,
        tenant_quotas: Mapping[str, int] | None = None,
        tenant_fast_lane: bool = True,
    ) -> None:
        self.name = name
        self._run_batch = run_batch
        self._executor = executor
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_items = max_batch_items
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue_items = max_queue_items
        self.skip_wait_when_idle = skip_wait_when_idle
        self.max_inflight = max(1, max_inflight)
        self._obs: BatchObserver = observer or _NullObserver()
        self._queue: list[_Pending] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closed = False
        self._inflight = 0  # batches being forwarded now
        self._tasks: set[asyncio.Task] = set()
        self._seq = 0
        self._lone_share = 0.0  # EWMA: share of requests that found nothing queued or running
        self._arrivals = 0
        # a forward's fixed cost in tokens: set by the operator or measured at warm-up
        # (reward_server.engine.calibration); infinite fills the token budget
        self.overhead_tokens = math.inf
        # tenants (docs/API.md, "Tenants"): share = weight in the deficit round robin (default
        # 1); a queue quota per tenant (0 = only max_queue_items)
        self.tenant_shares = dict(tenant_shares or {})
        self.tenant_max_queued_items = tenant_max_queued_items
        self.tenant_quotas = dict(tenant_quotas or {})
        self._queued: dict[str, int] = {}  # items queued per tenant (insertion order: activation)
        self._deficit: dict[str, float] = {}  # DRR deficit counter per queued tenant, tokens
        self._anchored: dict[str, int] = {}  # fair batch in which a queued tenant last anchored
        self._fair_batches = 0
        # the fast lane (`_lane_window`): one extra forward at a time, on a thread of its own,
        # for a light tenant's items while other tenants' forwards hold the streams
        self.tenant_fast_lane = tenant_fast_lane
        self._lane_busy = False
        self._lane_executor: ThreadPoolExecutor | None = None
        self._inflight_tenants: dict[str, int] = {}  # items in a forward now, per tenant
        self._recent: dict[str, float] = {}  # tokens forwarded recently per tenant (`_account`)
        # when set, refits overhead_tokens from the forwards run (calibration.OverheadLearner)
        self.overhead_learner: Any = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the scheduling task on the running loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._loop(), name=f"batcher-{self.name}"
            )

    def close(self) -> None:
        """Refuse new work (UNAVAILABLE); queued work still runs."""
        self._closed = True

    async def stop(self) -> None:
        """Cancel the scheduling task (batches already in a forward are awaited)."""
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._lane_executor is not None:
            self._lane_executor.shutdown(wait=False)
            self._lane_executor = None

    # ------------------------------------------------------------------ submit
    async def submit(
        self,
        payloads: Sequence[Any],
        lengths: Sequence[int],
        deadline: float | None = None,
        tenant: str = DEFAULT_TENANT,
    ) -> Submitted:
        """Queue items of `tenant` and wait for their results (in order).

        `deadline` is a `time.monotonic()` instant; items still queued then are dropped with
        DeadlineExceeded. If the caller is cancelled (client gone), its items are dropped.
        A tenant over its queue quota gets ResourceExhausted (other tenants are still served).
        """
        if self._closed:
            raise Unavailable("server is draining for shutdown; retry on another replica")
        quota = self.tenant_quotas.get(tenant, self.tenant_max_queued_items)
        mine = self._queued.get(tenant, 0)
        if quota and mine + len(payloads) > quota:
            self._obs.on_dropped(self.name, "tenant_quota", len(payloads))
            raise ResourceExhausted(
                f"tenant {tenant!r} has {mine} item(s) queued for model {self.name!r}; "
                f"{len(payloads)} more exceed its quota of {quota}; retry with backoff"
            )
        if len(self._queue) + len(payloads) > self.max_queue_items:
            self._obs.on_dropped(self.name, "queue_full", len(payloads))
            raise ResourceExhausted(
                f"queue of model {self.name!r} is full ({len(self._queue)} queued + {len(payloads)} new > "
                f"max_queue_items {self.max_queue_items}); retry with backoff"
            )
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        lone = 0.0 if (self._queue or self._inflight) else 1.0
        self._lone_share = lone if self._arrivals == 0 else 0.8 * self._lone_share + 0.2 * lone
        self._arrivals += 1
        futures = []
        for payload, length in zip(payloads, lengths, strict=True):
            fut = loop.create_future()
            self._seq += 1
            self._queue.append(
                _Pending(payload, int(length), fut, now, deadline, self._seq, tenant)
            )
            futures.append(fut)
        if payloads:
            if not mine:  # a newly active tenant: its first quantum at once (`_fair_window`)
                self._deficit[tenant] = max(self._quantum(tenant), float(lengths[0]))
            self._queued[tenant] = mine + len(payloads)
        self._obs.on_queue_depth(self.name, len(self._queue))
        self._wakeup.set()
        # The deadline is one timer that fails the items' own futures, and the futures are awaited
        # in turn: no wait_for (an extra future, task wrapper and callbacks) and no gather per
        # request, the largest Python costs of a single-item request after tokenisation
        # (docs/BENCHMARKS.md, "Token-in scoring and per-request cost").
        timer = None
        if deadline is not None:
            timer = loop.call_at(
                loop.time() + max(0.0, deadline - now), self._expire, futures, len(payloads)
            )
        try:
            outs = [await f for f in futures]
        except BaseException:
            for f in futures:
                if not f.done():
                    f.cancel()  # dropped before the forward if still queued
                elif not f.cancelled():
                    f.exception()  # retrieved: no "exception was never retrieved" log
            raise
        finally:
            if timer is not None:
                timer.cancel()
        return Submitted([o[0] for o in outs], max(o[1] for o in outs), max(o[2] for o in outs))

    def _expire(self, futures: list[asyncio.Future], n: int) -> None:
        """A request's deadline passed: fail its items that have no result yet."""
        exc = DeadlineExceeded(f"deadline passed while {n} item(s) waited for model {self.name!r}")
        for f in futures:
            if not f.done():
                f.set_exception(exc)

    # ------------------------------------------------------------------ scheduling
    def _drop_dead(self) -> None:
        now = time.monotonic()
        keep, cancelled, expired = [], 0, 0
        for p in self._queue:
            if p.future.done():
                cancelled += 1
            elif p.deadline is not None and now >= p.deadline:
                p.future.set_exception(
                    DeadlineExceeded(
                        f"deadline passed after {now - p.enqueued:.3f}s in the queue of model {self.name!r}"
                    )
                )
                expired += 1
            else:
                keep.append(p)
                continue
            self._dequeued(p.tenant)
        if cancelled:
            self._obs.on_dropped(self.name, "cancelled", cancelled)
        if expired:
            self._obs.on_dropped(self.name, "deadline", expired)
        self._queue = keep

    def _dequeued(self, tenant: str) -> None:
        """One item of `tenant` left the queue; a tenant with none left is no longer active and
        its deficit is reset (DRR: an empty queue keeps no credit)."""
        left = self._queued[tenant] - 1
        if left:
            self._queued[tenant] = left
        else:
            del self._queued[tenant]
            self._deficit.pop(tenant, None)
            self._anchored.pop(tenant, None)

    def _quantum(self, tenant: str) -> float:
        """Tokens a tenant's deficit gains per DRR round: a quarter of the batch budget times
        its share (fine-grained: two equal tenants get half a batch each per round)."""
        return self.max_batch_tokens / 4 * self.tenant_shares.get(tenant, 1.0)

    def _window(self) -> list[int]:
        if len(self._queued) > 1:
            return self._fair_window()
        lengths = [p.length for p in self._queue]
        anchor = min(range(len(self._queue)), key=lambda i: self._queue[i].seq)
        return plan_window(
            lengths, anchor, self.max_batch_tokens, self.max_batch_items, self.overhead_tokens
        )

    def _fair_window(self) -> list[int]:
        """The next batch when several tenants have items queued: deficit round robin adapted
        to batches.

        Each tenant has a deficit counter in tokens. Its oldest items are *eligible* while their
        total length fits its deficit. When the eligible items of all tenants add up to less than
        FAIR_POOL_BATCHES batch budgets and some tenant has items that are not eligible, a DRR
        round adds the quantum (budget / 4 x share) to the deficit of each tenant with items
        beyond its deficit; a tenant whose queue its deficit already covers gets none and keeps
        no more credit than its queued tokens (as DRR resets an idle flow's deficit: a tenant
        asking less than its share cannot bank the rest). A newly active tenant's deficit starts
        at one quantum, or its first item's length if longer. The batch's anchor is the oldest
        item of the tenant with eligible items that anchored least recently (one that has just
        become active first: a light tenant's lone request goes into the next batch); the window
        around it is filled by length and budget (`plan_window`) from the eligible items of every
        tenant, and each tenant's deficit pays for the tokens it got. Over a backlog each
        tenant's tokens follow its share, and every tenant with eligible items anchors a batch at
        least once in as many batches as there are tenants (no starvation)."""
        by_tenant: dict[str, list[int]] = {t: [] for t in self._queued}
        for i in sorted(range(len(self._queue)), key=lambda i: self._queue[i].seq):
            by_tenant[self._queue[i].tenant].append(i)
        target = FAIR_POOL_BATCHES * self.max_batch_tokens
        while True:
            eligible: dict[str, list[int]] = {}
            short: set[str] = set()  # tenants with items beyond their deficit
            total = 0
            for t, idx in by_tenant.items():
                budget, n = self._deficit.get(t, 0.0), 0
                for i in idx:
                    if self._queue[i].length > budget:
                        short.add(t)
                        break
                    budget -= self._queue[i].length
                    n += 1
                if n:
                    eligible[t] = idx[:n]
                    total += self._deficit.get(t, 0.0) - budget
            if (total >= target and eligible) or not short:
                break
            for t, idx in by_tenant.items():  # a DRR round
                if t in short:
                    self._deficit[t] = self._deficit.get(t, 0.0) + self._quantum(t)
                else:
                    queued = sum(self._queue[i].length for i in idx)
                    self._deficit[t] = min(self._deficit.get(t, 0.0), queued)
        anchor_tenant = min(eligible, key=lambda t: self._anchored.get(t, -1))
        self._fair_batches += 1
        self._anchored[anchor_tenant] = self._fair_batches
        candidates = [i for idx in eligible.values() for i in idx]
        anchor = candidates.index(eligible[anchor_tenant][0])
        lengths = [self._queue[i].length for i in candidates]
        budget = self.max_batch_tokens
        if len(eligible[anchor_tenant]) == self._queued[anchor_tenant] and self._light(
            anchor_tenant
        ):  # a light tenant's batch: little beyond its own items, so it returns fast
            budget = self._light_budget(eligible[anchor_tenant])
        window = plan_window(lengths, anchor, budget, self.max_batch_items, self.overhead_tokens)
        chosen = [candidates[k] for k in window]
        for i in chosen:
            p = self._queue[i]
            self._deficit[p.tenant] -= p.length
        return chosen

    def lane_tokens(self) -> int:
        """The most padded tokens of one fast-lane forward, and of a batch anchored on a light
        tenant: a quarter of the batch budget (one share-1 tenant's DRR quantum)."""
        return max(1, self.max_batch_tokens // 4)

    def _light(self, tenant: str) -> bool:
        """Whether `tenant` is *light*: another tenant has items queued or in a forward, nothing
        of `tenant` is in a forward, it has at most `max_batch_items` items queued, and its
        share of the tokens forwarded recently (`_recent`) is below its fair share among the
        tenants active now (its weight over theirs). A light tenant waits on the others; a
        backlogged one, or one that has had its share, is not light."""
        queued = self._queued.get(tenant, 0)
        if tenant in self._inflight_tenants or not queued or queued > self.max_batch_items:
            return False
        active = set(self._queued) | set(self._inflight_tenants)
        if len(active) < 2:
            return False
        total = sum(self._recent.get(t, 0.0) for t in active)
        if total <= 0:
            return True
        weights = sum(self.tenant_shares.get(t, 1.0) for t in active)
        fair = self.tenant_shares.get(tenant, 1.0) / weights
        return self._recent.get(tenant, 0.0) / total < fair

    def _lane_window(self) -> list[int]:
        """A batch for the fast lane (while every forward stream is busy), or none.

        While the lane is free, the first light tenant (`_light`; in order of activation) whose
        queued items all fit its DRR deficit (it asks no more than its quantum) and one lane
        forward (`lane_tokens`) has its items run at once on the lane's thread, beside the
        streams' forwards, instead of waiting for one of them to end. The batch is anchored on
        its oldest item and takes other tenants' items (those their deficits cover) only within
        `_light_budget`, so it stays short; each tenant's deficit pays for its tokens as in any
        batch. Backlogged tenants never use the lane, and with one tenant there is none."""
        if (
            not self.tenant_fast_lane
            or self._lane_busy
            or len(self._queued) + len(self._inflight_tenants) < 2
        ):
            return []
        for tenant in self._queued:
            if not self._light(tenant):
                continue
            own = [i for i, p in enumerate(self._queue) if p.tenant == tenant]
            lengths = [self._queue[i].length for i in own]
            if sum(lengths) > self._deficit.get(tenant, 0.0):
                continue
            if len(own) * max(lengths) > self.lane_tokens():
                continue
            # company within a small cost: other tenants' oldest items that their deficits cover
            by_tenant: dict[str, list[int]] = {}
            for i in sorted(range(len(self._queue)), key=lambda i: self._queue[i].seq):
                if self._queue[i].tenant != tenant:
                    by_tenant.setdefault(self._queue[i].tenant, []).append(i)
            candidates = list(own)
            for t, idx in by_tenant.items():
                budget = self._deficit.get(t, 0.0)
                for i in idx:
                    budget -= self._queue[i].length
                    if budget < 0:
                        break
                    candidates.append(i)
            window = plan_window(
                [self._queue[i].length for i in candidates],
                0,
                self._light_budget(own),
                self.max_batch_items,
                self.overhead_tokens,
            )
            chosen = [candidates[k] for k in window]
            for i in chosen:
                self._deficit[self._queue[i].tenant] -= self._queue[i].length
            return chosen
        return []

    def _light_budget(self, own: list[int]) -> int:
        """The padded-token budget of a batch anchored on a light tenant whose queued items are
        `own`: its own padded tokens plus at most one forward's fixed cost (`overhead_tokens`)
        of other tenants' items, within `lane_tokens` (and the batch budget). Such a batch
        costs at most about twice a forward of its own items, so the light tenant's answer
        comes fast, and the fixed cost it pays anyway carries some of the others' work."""
        own_padded = len(own) * max(self._queue[i].length for i in own)
        budget = max(own_padded, min(self.lane_tokens(), own_padded + self.overhead_tokens))
        return int(min(budget, self.max_batch_tokens))

    def _account(self, batch: list[_Pending]) -> None:
        """Count a batch's tokens in the tenants' recent tokens (`_recent`): every count decays
        by half per `RECENT_HALF_LIFE_BATCHES` batch budgets of tokens forwarded, so the counts
        are a moving window over the last few dozen batches (deterministic: no clock)."""
        tokens = sum(p.length for p in batch)
        decay = 0.5 ** (tokens / (RECENT_HALF_LIFE_BATCHES * self.max_batch_tokens))
        for t in list(self._recent):
            self._recent[t] *= decay
            if self._recent[t] < 1.0 and t not in self._queued:
                del self._recent[t]
        for p in batch:
            self._recent[p.tenant] = self._recent.get(p.tenant, 0.0) + p.length

    async def _loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while True:
                self._drop_dead()
                if not self._queue:
                    break
                if self._inflight >= self.max_inflight:
                    lane = self._lane_window()
                    if not lane:
                        break
                    self._start(lane, lane=True)
                    continue
                window = self._window()
                full = len(window) < len(self._queue) or len(window) >= self.max_batch_items
                oldest = min(p.enqueued for p in self._queue)
                remaining = oldest + self.max_wait - time.monotonic()
                if not full and remaining > 0 and not self._closed and self._company_likely():
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), remaining)
                        self._wakeup.clear()
                    except asyncio.TimeoutError:
                        pass
                    continue
                self._start(window)
            self._obs.on_queue_depth(self.name, len(self._queue))

    def _company_likely(self) -> bool:
        """Whether waiting up to max_wait may bring company. Not when nearly every recent request
        found the model idle and its queue empty: one client waiting for each answer (low load),
        where the wait would only add max_wait to every latency. Under load requests arrive
        while others are queued or running, and the wait stays. With little history, wait."""
        if not self.skip_wait_when_idle:
            return True
        return self._arrivals < 3 or self._lone_share < 0.9

    def _start(self, window: list[int], lane: bool = False) -> None:
        """Take the window's items off the queue and forward them in a task of their own (on the
        fast lane's thread when `lane`); the loop is woken when it ends (a stream is free)."""
        chosen = set(window)
        batch = [self._queue[i] for i in sorted(window, key=lambda i: self._queue[i].seq)]
        self._queue = [p for i, p in enumerate(self._queue) if i not in chosen]
        for p in batch:
            self._dequeued(p.tenant)
            self._inflight_tenants[p.tenant] = self._inflight_tenants.get(p.tenant, 0) + 1
        self._account(batch)
        self._obs.on_queue_depth(self.name, len(self._queue))
        if lane:
            self._lane_busy = True
            if self._lane_executor is None:
                self._lane_executor = ThreadPoolExecutor(1, thread_name_prefix=f"lane-{self.name}")
            executor: Executor = self._lane_executor
        else:
            self._inflight += 1
            executor = self._executor
        task = asyncio.get_running_loop().create_task(self._dispatch(batch, executor, lane))
        self._tasks.add(task)

        def done(t: asyncio.Task) -> None:
            self._tasks.discard(t)
            if lane:
                self._lane_busy = False
            else:
                self._inflight -= 1
            for p in batch:
                left = self._inflight_tenants[p.tenant] - 1
                if left:
                    self._inflight_tenants[p.tenant] = left
                else:
                    del self._inflight_tenants[p.tenant]
            self._wakeup.set()

        task.add_done_callback(done)

    async def _dispatch(self, batch: list[_Pending], executor: Executor, lane: bool) -> None:
        start = time.monotonic()
        for p in batch:
            self._obs.on_queue_time(self.name, start - p.enqueued)
        payloads = [p.payload for p in batch]
        real = sum(p.length for p in batch)
        padded = max(p.length for p in batch) * len(batch)
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                executor, self._run_batch, payloads
            )
        except ServiceError as exc:
            self._fail(batch, exc)
            return
        except Exception as exc:  # a bug or device failure: fail this batch, keep serving
            log.exception(
                "forward failed for model %r on a batch of %d items", self.name, len(batch)
            )
            self._fail(batch, exc)
            return
        seconds = time.monotonic() - start
        self._obs.on_batch(self.name, len(batch), real, padded, seconds)
        if self.overhead_learner is not None and not lane:  # a lane forward shares the cores
            self.overhead_tokens = self.overhead_learner.observe(padded, seconds)
        if len(results) != len(batch):
            self._fail(
                batch,
                RuntimeError(
                    f"model {self.name!r} returned {len(results)} results for {len(batch)} items"
                ),
            )
            return
        for p, r in zip(batch, results, strict=True):
            if not p.future.done():
                p.future.set_result((r, start - p.enqueued, seconds))
        self._report_tenants(batch, start)

    def _report_tenants(self, batch: list[_Pending], start: float) -> None:
        """Per tenant of a forwarded batch: items, real tokens, queue times (the observer's
        per-tenant metrics)."""
        per: dict[str, list[_Pending]] = {}
        for p in batch:
            per.setdefault(p.tenant, []).append(p)
        for tenant, ps in per.items():
            self._obs.on_tenant_batch(
                self.name,
                tenant,
                len(ps),
                sum(p.length for p in ps),
                [start - p.enqueued for p in ps],
            )

    @staticmethod
    def _fail(batch: list[_Pending], exc: BaseException) -> None:
        for p in batch:
            if not p.future.done():
                p.future.set_exception(exc)
