"""CUDA out-of-memory batch halving (reward_server/models/runner.py), with a fake forward: the
logic and the memory release run here; the real CUDA case is in tests/integration/test_gpu_serving.py."""

from __future__ import annotations

import gc
import weakref

import pytest

from reward_server.models.runner import run_with_oom_split


class Activation:
    """Stands for a tensor the failed forward held in its frame."""


def test_split_until_it_fits_in_order_and_failed_frames_are_released() -> None:
    alive: list[weakref.ref] = []
    calls: list[int] = []

    def forward(batch: list[int]) -> list[int]:
        calls.append(len(batch))
        # Every earlier failed attempt's activations must be gone by the time we retry.
        gc.collect()
        assert all(ref() is None for ref in alive), "a failed forward's frame is still held"
        act = Activation()
        if len(batch) > 2:
            alive.append(weakref.ref(act))
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [x * 10 for x in batch]

    assert run_with_oom_split(forward, list(range(7))) == [x * 10 for x in range(7)]
    assert calls == [7, 3, 1, 2, 4, 2, 2]


def test_other_errors_and_single_items_raise() -> None:
    def bad(batch: list[int]) -> list[int]:
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_with_oom_split(bad, [1, 2, 3])

    def oom(batch: list[int]) -> list[int]:
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        run_with_oom_split(oom, [1, 2])
