"""Batch planning: length-sorted batches against arrival order, and the cost-aware window."""

from __future__ import annotations

import math
import random

from bench.inprocess import arrival_batches, sorted_batches
from reward_server.engine.batcher import plan_window


def efficiency(lengths: list[int], batches: list[list[int]]) -> float:
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return real / padded


def uniform(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(16, 256) for _ in range(n)]


def test_sorted_and_arrival_batches_cover_every_item_once_within_budget():
    lengths = uniform(500)
    for plan in (sorted_batches, arrival_batches):
        batches = plan(lengths, 2048, 64)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        assert all(len(b) * max(lengths[i] for i in b) <= 2048 for b in batches)


def test_sorted_batches_waste_little_padding_and_arrival_order_wastes_much():
    lengths = uniform(500)
    assert efficiency(lengths, sorted_batches(lengths, 2048, 64)) >= 0.95
    assert efficiency(lengths, arrival_batches(lengths, 2048, 64)) < 0.7


def test_infinite_overhead_fills_the_budget_like_before():
    lengths = [10, 200, 12, 11, 190, 13]
    assert sorted(plan_window(lengths, 0, 60, 8, math.inf)) == [0, 2, 3, 5]


def test_zero_overhead_batches_only_equal_lengths():
    lengths = [50, 50, 51, 49, 50, 120]
    w = plan_window(lengths, 0, 10_000, 64, overhead_tokens=0.0)
    assert sorted(w) == [0, 1, 4]


def test_overhead_bounds_the_padding_each_item_may_add():
    lengths = [100, 96, 90, 60, 104, 140]
    # overhead 20 tokens: the 2nd item may add <= 10 padded tokens, the 3rd <= 6.7, ...
    w = plan_window(lengths, 0, 10_000, 64, overhead_tokens=20.0)
    assert sorted(lengths[i] for i in w) == [100, 104]  # 96 would now add 8 > 6.7
    longest = max(lengths[i] for i in w)
    assert all(longest - lengths[i] <= 20 for i in w)


def simulated_cost(lengths: list[int], overhead: float, window_overhead: float) -> float:
    """Total cost (overhead per forward + padded tokens) of serving a stream through a queue of
    24 items, the oldest item always in the batch; windows planned with `window_overhead`."""
    pending = list(range(24))
    nxt, total = 24, 0.0
    while pending:
        sub = [lengths[i] for i in pending]
        w = plan_window(sub, 0, 2048, 64, window_overhead)
        total += overhead + len(w) * max(sub[k] for k in w)
        chosen = {pending[k] for k in w}
        pending = [p for p in pending if p not in chosen]
        while len(pending) < 24 and nxt < len(lengths):
            pending.append(nxt)
            nxt += 1
    return total


def test_cost_aware_window_serves_a_stream_cheaper_than_filling_the_budget():
    lengths = uniform(600, seed=3)
    for overhead in (5.0, 60.0):  # a CPU-like model: the forward costs little beyond its tokens
        assert simulated_cost(lengths, overhead, overhead) < simulated_cost(
            lengths, overhead, math.inf
        )
