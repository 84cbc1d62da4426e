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
from collections.abc import Sequence
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


def overhead_from_timings(
    t_big: float, padded_big: int, t_small: float, padded_small: int
) -> float:
    """Fit ``seconds = c0 + c1 * padded_tokens`` through a big and a small batch and return
    ``c0 / c1``: a forward's fixed cost in tokens (infinite when the fit fails, which makes the
    batcher fill its budget)."""
    if padded_big <= padded_small or t_big <= t_small:
        return math.inf
    c1 = (t_big - t_small) / (padded_big - padded_small)
    return max(0.0, (t_small - c1 * padded_small) / c1)


def padded_tokens(items: Sequence[Any]) -> int:
    """Tokens of a batch padded to its longest item."""
    lengths = lengths_of(items)
    return len(lengths) * max(lengths)


async def measure_overhead_tokens(
    runner: Any, big: list[Any], executor: Executor, streams: int
) -> float:
    """The fixed cost of one forward of `runner` in tokens: time the full batch `big` and a
    one-item batch, each with `streams` forwards at once on `executor` (each forward then pays
    for the cores and the interpreter lock it shares, as it will under load), and fit
    `overhead_from_timings`. On a GPU the fixed cost dominates, so batches fill; on a CPU it is
    small, so the batcher keeps batches short and tight (docs/BENCHMARKS.md)."""
    loop = asyncio.get_running_loop()
    small = runner.warmup_items(64, 1)

    async def best_of(items: list[Any], n: int) -> float:
        best = math.inf
        for _ in range(n):
            t = time.perf_counter()
            await asyncio.gather(
                *(loop.run_in_executor(executor, runner.forward, items) for _ in range(streams))
            )
            best = min(best, time.perf_counter() - t)
        return best

    t_big, t_small = await best_of(big, 1), await best_of(small, 3)
    return overhead_from_timings(t_big, padded_tokens(big), t_small, padded_tokens(small))
