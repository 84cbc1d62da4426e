"""The in-process limit: the same runner, dtype and items, with the best batching and no RPC.

Items are tokenised in one call, sorted by length and packed greedily under the same padded-token
budget and item cap the server uses, then forwarded one batch after another. This is what a
caller holding the model in its own process would get; the server's throughput is reported as a
fraction of it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from reward_server.engine.calibration import (
    calibration_batches,
    fastest_times,
    overhead_from_fit,
    padded_tokens,
)
from reward_server.models.reward import ScoreInput


@dataclass
class InprocessResult:
    """One timed in-process pass."""

    items: int
    """Items scored."""
    real_tokens: int
    """Unpadded tokens."""
    padded_tokens: int
    """Tokens including padding."""
    batches: int
    """Forwards run."""
    seconds: float
    """Wall time: tokenisation and forwards."""
    tokenize_seconds: float
    """Of which tokenisation."""

    @property
    def tokens_per_s(self) -> float:
        return self.real_tokens / self.seconds

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds

    @property
    def padding_efficiency(self) -> float:
        return self.real_tokens / max(1, self.padded_tokens)


def sorted_batches(lengths: Sequence[int], max_tokens: int, max_items: int) -> list[list[int]]:
    """Indices sorted by length, packed greedily: ``count * longest <= max_tokens``."""
    return tight_batches(lengths, max_tokens, max_items, math.inf)


def tight_batches(
    lengths: Sequence[int], max_tokens: int, max_items: int, overhead_tokens: float
) -> list[list[int]]:
    """Indices sorted by length, packed greedily under ``count * longest <= max_tokens`` and the
    item cap; an item joins only when the padding it adds is at most its share of a forward's
    fixed cost (the server's cost-aware rule, reward_server.engine.batcher; infinite = no such rule)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        n = len(cur)
        if cur and (
            n + 1 > max_items
            or (n + 1) * lengths[i] > max_tokens
            or n * (lengths[i] - lengths[cur[-1]]) > overhead_tokens / (n + 1)
        ):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def measure_overhead_tokens(runner: Any, max_tokens: int, max_items: int) -> float:
    """A forward's fixed cost in tokens, as the server measures it at warm-up (the same batches,
    rounds and fit: `reward_server.engine.calibration`), with one stream and no event loop."""
    batches = calibration_batches(runner, max_tokens, max_items)

    def timed(items: list[Any]) -> float:
        t = time.perf_counter()
        runner.forward(items)
        return time.perf_counter() - t

    best = fastest_times(timed, batches)
    return overhead_from_fit([(padded_tokens(b), t) for b, t in zip(batches, best, strict=True)])


def arrival_batches(lengths: Sequence[int], max_tokens: int, max_items: int) -> list[list[int]]:
    """Indices in arrival order, packed greedily under the same budget (no sorting)."""
    batches: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i, n in enumerate(lengths):
        if cur and (len(cur) + 1 > max_items or (len(cur) + 1) * max(longest, n) > max_tokens):
            batches.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        batches.append(cur)
    return batches


def run_inprocess(
    runner: Any,
    pairs: Sequence[tuple[str, str]],
    *,
    max_tokens: int,
    max_items: int,
    order: str = "sorted",
    overhead_tokens: float | None = None,
    streams: int = 1,
    threads: int = 0,
) -> InprocessResult:
    """Tokenise and score `pairs` with `runner` (a RewardRunner or OnnxRewardRunner).

    order: "sorted" (fill the budget in length order), "arrival", or "tight" (sorted, with the
    server's cost-aware rule for `overhead_tokens`). `streams` forwards run at once (threads),
    as the server's --forward-streams; `threads` (when not 0) intra-op threads for this pass."""
    if threads:
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return run_inprocess(
                runner,
                pairs,
                max_tokens=max_tokens,
                max_items=max_items,
                order=order,
                overhead_tokens=overhead_tokens,
                streams=streams,
            )
        finally:
            torch.set_num_threads(before)
    t0 = time.perf_counter()
    encoded = runner.encode([ScoreInput(p, c) for p, c in pairs], "right")
    t1 = time.perf_counter()
    lengths = [len(e.input_ids) for e in encoded]
    if order == "tight":
        batches = tight_batches(lengths, max_tokens, max_items, float(overhead_tokens or 0.0))
    else:
        plan = sorted_batches if order == "sorted" else arrival_batches
        batches = plan(lengths, max_tokens, max_items)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    if streams > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(streams) as pool:
            list(pool.map(lambda b: runner.forward([encoded[i] for i in b]), batches))
    else:
        for b in batches:
            runner.forward([encoded[i] for i in b])
    t2 = time.perf_counter()
    return InprocessResult(len(pairs), sum(lengths), padded, len(batches), t2 - t0, t1 - t0)


def forward_seconds(runner: Any, batch_size: int, length: int, repeats: int = 5) -> float:
    """Median seconds of one forward of `batch_size` items of `length` tokens."""
    from reward_server.models.reward import EncodedItem

    tok = 0 if runner.pad_id != 0 else 1
    batch = [EncodedItem([tok] * length, False) for _ in range(batch_size)]
    runner.forward(batch)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        runner.forward(batch)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]
