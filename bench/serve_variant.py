"""`reward-server serve` with arrival-order batching (or, with BENCH_BATCH_VARIANT=fill,
budget-filling length-sorted windows), for side-by-side comparisons.

The real server with one thing changed: the batcher takes the oldest queued items in arrival order
under the same token budget and item cap, instead of a length-sorted window. Everything else
(tokenisation, gRPC, metrics) is the real server's.

    python -m bench.serve_variant serve --reward-model DIR ...
"""

from __future__ import annotations

import os
import sys

from reward_server.engine import batcher as batcher_mod


def arrival_window(self: batcher_mod.DynamicBatcher) -> list[int]:
    """Queue indices of the oldest items that fit the budget, in arrival order."""
    order = sorted(range(len(self._queue)), key=lambda i: self._queue[i].seq)
    chosen: list[int] = []
    longest = 0
    for i in order:
        n = self._queue[i].length
        if chosen and (
            len(chosen) + 1 > self.max_batch_items
            or (len(chosen) + 1) * max(longest, n) > self.max_batch_tokens
        ):
            break
        chosen.append(i)
        longest = max(longest, n)
    return chosen


async def _infinite_overhead(runner, max_tokens, max_items, executor, streams) -> float:  # noqa: ANN001
    """`calibration.measure_overhead_tokens`'s signature: infinite, so batches fill the budget."""
    return float("inf")


def main() -> int:
    variant = os.environ.get("BENCH_BATCH_VARIANT", "arrival")
    if variant == "arrival":
        batcher_mod.DynamicBatcher._window = arrival_window  # the one change
    elif variant == "fill":  # length-sorted windows that fill the budget (no cost-aware rule)
        from reward_server.engine import calibration

        calibration.measure_overhead_tokens = _infinite_overhead
    else:
        raise SystemExit(f"unknown BENCH_BATCH_VARIANT {variant!r}")
    from reward_server.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
