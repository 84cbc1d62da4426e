"""What every model runner shares: the batch interface the batcher calls, and CUDA OOM splitting."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


def is_oom(exc: BaseException) -> bool:
    """True for a CUDA out-of-memory error."""
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def run_with_oom_split(forward: Callable[[Sequence[T]], list[R]], batch: Sequence[T]) -> list[R]:
    """Run `forward(batch)`; on CUDA out-of-memory split the batch in halves and retry each
    (a batch is split and retried, not failed: docs/API.md, "Batching"). A single item that
    still does not fit re-raises."""
    try:
        return forward(batch)
    except RuntimeError as exc:
        if not is_oom(exc) or len(batch) <= 1:
            raise
    # Retried outside the handler: inside it the exception's traceback still holds the failed
    # forward's frames and their activations, so the halves would find the memory still taken.
    import torch

    torch.cuda.empty_cache()
    half = len(batch) // 2
    log.warning(
        "out of memory on a batch of %d items; splitting into %d + %d",
        len(batch),
        half,
        len(batch) - half,
    )
    return run_with_oom_split(forward, batch[:half]) + run_with_oom_split(forward, batch[half:])


def one_at_a_time(forward: Callable[[Sequence[T]], list[R]]) -> Callable[[Sequence[T]], list[R]]:
    """`forward` applied to each item of a batch alone: the batch-invariant mode. An item's
    result then depends on nothing but the item (same shapes, no padding, no neighbours), so it
    is bitwise the same however it was batched; the batch still shares its queueing, its
    tokenisation and its trip to the worker thread."""

    def run(batch: Sequence[T]) -> list[R]:
        out: list[R] = []
        for item in batch:
            out += forward([item])
        return out

    return run


def lengths_of(items: Sequence[Any]) -> list[int]:
    """Token lengths of encoded items (each has `input_ids` or `token_ids`)."""
    return [len(getattr(it, "input_ids", None) or it.token_ids) for it in items]
