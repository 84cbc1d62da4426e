"""Reward-hacking telemetry: per served reward model (or combination) and per tenant, a sliding
window of the scored items, and its figures on demand (GetStats, /metrics).

The Score path only appends one tuple per item to a bounded deque (`ScoreWindow.add`: O(1) per
item, ~1 us; docs/BENCHMARKS.md); the figures (`reward_server.reward_stats.summarize`, the same
functions the PPO trainer logs its own figures with) are computed when asked for, over at most
``window_items`` items. Length is the item's total token count as the reward model read it
(``ItemScore.num_tokens``: prompt + completion after truncation; the engine never splits them
into tokens), so the length correlation tracks completion length as long as prompt lengths do
not move with the score (one training job's prompts come from a fixed distribution).

Tenants: the caller's tenant as `serve.tenants.TenantResolver` names it (a named token's name,
or the `tenant` metadata key when auth is off); at most
``max_tenants`` distinct tenants get their own windows (and Prometheus label values), the others
share `OTHER_TENANT`, so label cardinality stays bounded whatever the callers send.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from reward_server.reward_stats import NAN, ScoreStats, drift_sigma, mean_std, summarize
from reward_server.score_result import ScoreResult

OTHER_TENANT = "_other"
"""The shared tenant of every tenant past ``max_tenants``."""
SCORE_BUCKETS = (-10.0, -5.0, -3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0)
"""Upper bounds of the cumulative score histogram (`reward_server_scores`, Prometheus ``le``
buckets, +Inf implied): fixed, so rate() over them gives the distribution of any period."""


@dataclass
class WindowStats:
    """The figures of one (model, tenant) window."""

    model: str
    tenant: str
    total_items: int
    """Items scored since the server started (the window holds the last ones)."""
    span_seconds: float
    """Seconds between the window's oldest and newest item."""
    stats: ScoreStats
    bucket_counts: list[int]
    """Every score since the start by `SCORE_BUCKETS` bucket (not only the window's)."""
    score_sum: float
    """Their sum."""
    baseline_mean: float
    """Mean score of the first full window (NaN until there is one)."""
    baseline_std: float
    drift_sigma: float
    """(mean - baseline_mean) / baseline_std."""


class ScoreWindow:
    """The last ``max_items`` scored items (and, with ``max_seconds`` > 0, only those of the last
    ``max_seconds``) of one (model, tenant): (time, score, length, member scores) each."""

    def __init__(self, members: Sequence[str], max_items: int, max_seconds: float) -> None:
        self.members = tuple(members)
        self.max_items = max_items
        self.max_seconds = max_seconds
        self.items: deque[tuple[float, float, int, tuple[float, ...] | None]] = deque(
            maxlen=max_items
        )
        self.total = 0
        self.baseline: tuple[float, float] | None = None
        self.bucket_counts = [0] * (len(SCORE_BUCKETS) + 1)
        """Every score since the start, by `SCORE_BUCKETS` bucket (the last: above them all);
        counted here (a bisect per item) instead of by a prometheus_client Histogram, whose
        labels() and observe() cost ~4 us per request and ~3.5 us per item."""
        self.score_sum = 0.0
        self._lock = threading.Lock()  # the /metrics thread reads while the event loop writes

    def add(self, now: float, results: Sequence[ScoreResult]) -> None:
        """Append a request's items (the Score path: one tuple per item)."""
        members = self.members
        with self._lock:
            items = self.items
            expired = self.max_seconds > 0 and bool(items) and items[0][0] < now - self.max_seconds
            if expired and self.baseline is None and len(items) >= 2:
                # the first time window is over: its items are the baseline
                self.baseline = mean_std([it[1] for it in items])
            counts = self.bucket_counts
            for r in results:
                s = r.score
                row = tuple([r.head_scores[m] for m in members]) if members else None
                items.append((now, s, r.num_tokens, row))
                counts[bisect_left(SCORE_BUCKETS, s)] += 1
                self.score_sum += s
            self.total += len(results)
            if self.baseline is None and len(items) == self.max_items:
                # the first full window (the last max_items of the first requests' items)
                self.baseline = mean_std([it[1] for it in items])
            if expired:
                oldest = now - self.max_seconds
                while items and items[0][0] < oldest:
                    items.popleft()

    def snapshot(self) -> tuple[list[tuple[float, float, int, tuple[float, ...] | None]], int]:
        """A copy of the window's items and the total count."""
        with self._lock:
            return list(self.items), self.total

    def histogram(self) -> tuple[list[int], float]:
        """The cumulative score histogram: counts per `SCORE_BUCKETS` bucket, and their sum."""
        with self._lock:
            return list(self.bucket_counts), self.score_sum


class Telemetry:
    """Every window of the server, keyed by (model, tenant)."""

    def __init__(
        self,
        max_items: int = 1000,
        max_seconds: float = 0.0,
        max_tenants: int = 16,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_items = max_items
        self.max_seconds = max_seconds
        self.max_tenants = max_tenants
        self.clock = clock
        self.windows: dict[tuple[str, str], ScoreWindow] = {}
        self._tenants: set[str] = set()
        self._lock = threading.Lock()

    def tenant_label(self, tenant: str) -> str:
        """``tenant``, or `OTHER_TENANT` once ``max_tenants`` others have been seen."""
        if tenant in self._tenants:
            return tenant
        with self._lock:
            if len(self._tenants) < self.max_tenants:
                self._tenants.add(tenant)
                return tenant
        return OTHER_TENANT

    def observe(
        self, model: str, tenant: str, results: Sequence[ScoreResult], members: Sequence[str]
    ) -> str:
        """Record one answered request's items; returns the tenant label they were counted
        under. ``members``: the combination's member names (their ``head_scores``), else ()."""
        label = self.tenant_label(tenant)
        key = (model, label)
        win = self.windows.get(key)
        if win is None:
            with self._lock:
                win = self.windows.setdefault(
                    key, ScoreWindow(members, self.max_items, self.max_seconds)
                )
        win.add(self.clock(), results)
        return label

    def stats(self, model: str = "", tenant: str = "") -> list[WindowStats]:
        """The figures of every window (of ``model`` / ``tenant`` when given), sorted by key."""
        out = []
        now = self.clock()
        for (m, t), win in sorted(self.windows.items()):
            if (model and m != model) or (tenant and t != tenant):
                continue
            items, total = win.snapshot()
            if win.max_seconds > 0:
                items = [it for it in items if it[0] >= now - win.max_seconds]
            rows = [it[3] for it in items] if win.members else []
            st = summarize(
                [it[1] for it in items],
                [it[2] for it in items],
                win.members,
                rows,  # type: ignore[arg-type]
            )
            base_mean, base_std = win.baseline or (NAN, NAN)
            counts, total_sum = win.histogram()
            out.append(
                WindowStats(
                    model=m,
                    tenant=t,
                    total_items=total,
                    span_seconds=items[-1][0] - items[0][0] if items else 0.0,
                    stats=st,
                    bucket_counts=counts,
                    score_sum=total_sum,
                    baseline_mean=base_mean,
                    baseline_std=base_std,
                    drift_sigma=drift_sigma(st.mean, base_mean, base_std),
                )
            )
        return out
