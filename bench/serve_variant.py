"""`reward-server serve` with arrival-order batching, for the side-by-side padding comparison.

The real server with one thing changed: the batcher takes the oldest queued items in arrival order
under the same token budget and item cap, instead of a length-sorted window. Everything else
(tokenisation, gRPC, metrics) is the real server's.

    python -m bench.serve_variant serve --reward-model DIR ...
"""

from __future__ import annotations

import sys

from reward_server import batcher as batcher_mod


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


def main() -> int:
    batcher_mod.DynamicBatcher._window = arrival_window  # the one change
    from reward_server.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
