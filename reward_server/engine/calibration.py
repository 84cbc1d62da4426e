"""Calibrating the forward to the machine: the OpenMP wait policy, intra-op threads per forward
stream, and the fixed cost of one forward that the batcher weighs padding against.

Importing this module sets the OpenMP policy, so it is imported before anything imports torch
(the engine and the model registry import it first; torch itself loads lazily, with the models).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any

from reward_server.models.runner import lengths_of

log = logging.getLogger(__name__)

# Set before torch loads (the model layer imports it lazily, after this module): OpenMP worker
# threads sleep between parallel regions instead of spinning. A server's CPU is shared with its
# event loop, tokenizer threads and often other processes; spinning workers then take the cores
# the forward itself waits for. Measured on the shared 2-core CPU: a 2-layer model's forward went
# from 200 ms to 4 ms, serving throughput 3-7x (docs/BENCHMARKS.md). An operator's setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8  # glibc malloc.h mallopt parameters
MALLOC_SETTINGS = {
    "MALLOC_ARENA_MAX": (M_ARENA_MAX, 2),
    "MALLOC_MMAP_THRESHOLD_": (M_MMAP_THRESHOLD, 1 << 20),
}
"""The allocator settings the server makes for itself (glibc only), each unless the operator set
the environment variable of the same name: at most 2 malloc arenas (glibc makes up to 8 per core,
one per thread that allocates at once: gRPC's, the tokenizer pool's, the forward streams'), and a
fixed 1 MiB threshold above which blocks come from mmap and go back to the system when freed
(glibc otherwise raises the threshold after each large free, up to 32 MiB, so activations of
changing batch shapes stay in the heap and fragment it). Measured with `bench soak` on the tiny
models: RSS 515 -> 432 MB, flat over time either way (docs/BENCHMARKS.md, "Soak")."""


def configure_malloc() -> dict[str, int]:
    """Apply `MALLOC_SETTINGS` with mallopt(3) (before the server's threads start); returns what
    was set. Nothing on a C library other than glibc, or where the operator set the variable."""
    import ctypes
    import ctypes.util

    done: dict[str, int] = {}
    name = ctypes.util.find_library("c")
    if not name:
        return done
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return done
    for env, (param, value) in MALLOC_SETTINGS.items():
        if env in os.environ:
            continue
        if mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1:
            done[env] = value
    if done:
        log.info("malloc settings %s (an environment variable of the same name wins)", done)
    return done


def default_intra_op_threads(configured: int, streams: int, device: str) -> int:
    """Intra-op threads per forward: the configured number, else (several streams on a CPU) the
    usable cores shared among the streams, else 0 (torch's own default is left alone)."""
    if configured or streams <= 1 or device != "cpu":
        return configured
    return max(1, len(os.sched_getaffinity(0)) // streams)


def apply_intra_op_threads(configured: int, streams: int, device: str) -> int:
    """Set torch's intra-op threads to `default_intra_op_threads` (when it is not 0) and return
    that number (0 = torch's default; the ONNX backend takes the same number)."""
    import torch

    n = default_intra_op_threads(configured, streams, device)
    if n:
        torch.set_num_threads(n)
    log.info(
        "%d forward stream(s) on %s, %d intra-op thread(s) each",
        streams,
        device,
        torch.get_num_threads(),
    )
    return n


def overhead_from_fit(points: Sequence[tuple[int, float]]) -> float:
    """Least-squares fit of ``seconds = c0 + c1 * padded_tokens`` through ``(padded_tokens,
    seconds)`` points; returns ``c0 / c1``, a forward's fixed cost in tokens, clamped at 0
    (infinite when the tokens do not explain the time: no spread in tokens, or a slope <= 0)."""
    n = len(points)
    if n < 2:
        return math.inf
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    if var <= 0:
        return math.inf
    c1 = sum((x - mx) * (y - my) for x, y in points) / var
    if c1 <= 0:
        return math.inf
    return max(0.0, (my - c1 * mx) / c1)


def padded_tokens(items: Sequence[Any]) -> int:
    """Tokens of a batch padded to its longest item."""
    lengths = lengths_of(items)
    return len(lengths) * max(lengths)


CALIBRATION_LENGTH = 64
"""Tokens per item of the calibration batches (or the model's maximum length, when shorter)."""
CALIBRATION_SIZES = (1, 2, 4, 8)
"""Items per calibration batch: the sizes the cost-aware window chooses between on a CPU."""
CALIBRATION_ROUNDS = 5
"""Each size is timed this many times, interleaved; the fastest of each is kept."""


def calibration_batches(runner: Any, max_tokens: int, max_items: int) -> list[list[Any]]:
    """Batches of 1, 2, 4, 8 items of one length (`CALIBRATION_LENGTH`, no shared prefix),
    within the budget and the item cap."""
    out = []
    for n in CALIBRATION_SIZES:
        items = runner.warmup_items(CALIBRATION_LENGTH * n, n)
        if len(items) != n or n > max_items or padded_tokens(items) > max_tokens:
            break
        out.append(items)
    return out


def fastest_times(
    time_batch: Callable[[list[Any]], float], batches: list[list[Any]]
) -> list[float]:
    """`time_batch` each batch `CALIBRATION_ROUNDS` times, round-robin (so a burst of load on a
    shared machine hits every size, not one), keeping each batch's fastest time."""
    best = [math.inf] * len(batches)
    for _ in range(CALIBRATION_ROUNDS):
        for i, items in enumerate(batches):
            best[i] = min(best[i], time_batch(items))
    return best


async def measure_overhead_tokens(
    runner: Any, max_tokens: int, max_items: int, executor: Executor, streams: int
) -> float:
    """The fixed cost of one forward of `runner` in tokens. Batches of 1, 2, 4 and 8 items of
    one length (`calibration_batches`) are timed, each with `streams` forwards at once on
    `executor` (each forward then pays for the cores and the interpreter lock it shares, as it
    will under load), fastest of `CALIBRATION_ROUNDS` interleaved rounds, and
    ``seconds = c0 + c1 * padded_tokens`` is fitted through them (`overhead_from_fit`).

    The sizes are the ones the cost-aware window chooses between on a CPU: a full-budget batch
    is slower per token than a few items on a CPU (caches), so fitting through it understated
    the fixed cost, down to 0 on a loaded machine (then no two single-item requests shared a
    forward); one timing per size made that worse. On a GPU the fixed cost dominates and the
    batcher fills its budget without measuring (docs/BENCHMARKS.md)."""
    loop = asyncio.get_running_loop()
    batches = calibration_batches(runner, max_tokens, max_items)
    best = [math.inf] * len(batches)
    for _ in range(CALIBRATION_ROUNDS):
        for i, items in enumerate(batches):
            t = time.perf_counter()
            await asyncio.gather(
                *(loop.run_in_executor(executor, runner.forward, items) for _ in range(streams))
            )
            best[i] = min(best[i], time.perf_counter() - t)
    return overhead_from_fit([(padded_tokens(b), t) for b, t in zip(batches, best, strict=True)])


class OverheadLearner:
    """Refits a forward's fixed cost (in tokens) from the forwards a batcher actually runs, so
    the cost-aware window follows the machine after warm-up: on a shared CPU the warm-up's
    timings may come from a quiet or a busy moment, and the fixed cost of a forward (Python
    and kernel launches, which padding does not change) moves with the load.

    Each forward gives a point (padded tokens, seconds). Points are kept for the last `window`
    forwards, grouped by padded tokens into powers-of-two buckets, and every `every` forwards
    ``seconds = c0 + c1 * padded_tokens`` is fitted through each bucket's median (a burst of
    contention moves a median little; the buckets weigh rare and common sizes alike). A fit
    needs two buckets; one that fails (no spread, slope <= 0) keeps the last value.
    """

    def __init__(self, initial: float, window: int = 256, every: int = 32) -> None:
        self.value = initial
        self.window = window
        self.every = every
        self._points: list[tuple[int, float]] = []
        self._seen = 0

    def observe(self, padded: int, seconds: float) -> float:
        """Record one forward; returns the fixed cost to use from now on."""
        self._points.append((padded, seconds))
        if len(self._points) > self.window:
            del self._points[: len(self._points) - self.window]
        self._seen += 1
        if self._seen % self.every == 0:
            fitted = overhead_from_fit(bucket_medians(self._points))
            if math.isfinite(fitted):
                if abs(fitted - self.value) > 0.25 * max(self.value, 1.0):
                    log.debug("fixed cost refitted: %.0f -> %.0f tokens", self.value, fitted)
                self.value = fitted
        return self.value


def bucket_medians(points: Sequence[tuple[int, float]]) -> list[tuple[int, float]]:
    """Points grouped by padded tokens into powers-of-two buckets: each bucket's median tokens
    and median seconds."""
    buckets: dict[int, list[tuple[int, float]]] = {}
    for x, y in points:
        buckets.setdefault(max(1, x).bit_length(), []).append((x, y))
    out = []
    for pts in buckets.values():
        xs = sorted(x for x, _ in pts)
        ys = sorted(y for _, y in pts)
        out.append((xs[len(xs) // 2], ys[len(ys) // 2]))
    return out
