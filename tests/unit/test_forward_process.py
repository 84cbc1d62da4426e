"""`ForwardProcess` on its own (real worker processes, the tiny checkpoints): the same numbers as
the runner's forward in this process, the prefix-sharing reports carried back, a killed worker
answered with UNAVAILABLE and replaced, `close` leaving no process behind; and the config's
refusal of `forward_process` where it does not apply."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import psutil
import pytest

from reward_server.config import ConfigError, ServerConfig
from reward_server.errors import Unavailable
from reward_server.models.reward import EncodedItem, RewardRunner


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def runner(tiny_ckpts):
    import torch

    return RewardRunner("rm", str(tiny_ckpts.reward), device="cpu", dtype=torch.float32)


def _batch(runner) -> list[EncodedItem]:
    shared = list(range(5, 45))  # one prompt, three continuations: a shared-prefix group
    return [EncodedItem(shared + [50 + k, 60 + k, 70], False) for k in range(3)] + [
        EncodedItem([7, 8, 9, 10], False)
    ]


def test_forward_matches_reports_sharing_restarts_and_closes(runner) -> None:
    from reward_server.engine.forward_process import ForwardProcess

    reports: list[tuple[str, int, list[int]]] = []
    fp = ForwardProcess(runner, streams=1, threads=0, on_groups=lambda *r: reports.append(r))
    try:
        batch = _batch(runner)
        want = runner.forward(batch)  # this process, the same runner
        got = fp.forward(batch)
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)
        if runner.prefix_sharing:  # the worker's sharing report reaches the observer
            assert reports and reports[0][0] == "rm" and reports[0][1] >= 2 * 40
            assert reports[0][2] == [3]
        # the runner's other attributes are this process's
        assert fp.warmup_items(128, 2) == runner.warmup_items(128, 2)

        (pid,) = fp.pids
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(Unavailable, match=r"forward process \(pid \d+\) exited \(signal 9\)"):
            fp.forward(batch)
        again = fp.forward(batch)  # waits for the replacement, then answers
        for g, w in zip(again, want, strict=True):
            np.testing.assert_array_equal(g, w)
        assert fp.restarts == 1 and fp.pids != [pid] and not _alive(pid)
        pids = fp.pids
    finally:
        fp.close()
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)
    with pytest.raises(Unavailable, match="stopped"):
        fp.forward(batch)


def test_two_streams_answer_at_once_batch_invariant(runner) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from reward_server.engine.forward_process import ForwardProcess

    fp = ForwardProcess(runner, streams=2, threads=0, batch_invariant=True)
    try:
        assert len(set(fp.pids)) == 2
        batch = _batch(runner)
        want = [runner.forward([it])[0] for it in batch]  # each item alone, unpadded
        with ThreadPoolExecutor(2) as pool:
            outs = list(pool.map(fp.forward, [batch] * 6))
        for out in outs:
            for g, w in zip(out, want, strict=True):
                np.testing.assert_array_equal(g, w)
    finally:
        fp.close()


def test_a_lone_forward_takes_the_idle_workers_threads(runner) -> None:
    """Elastic threads: a forward that starts while the other worker is idle runs with
    `max_threads`; one that starts while the other runs keeps its own thread; batch-invariant
    mode never changes the number."""
    import threading

    from reward_server.engine.forward_process import ForwardProcess

    batch = _batch(runner)
    fp = ForwardProcess(runner, streams=2, threads=1, max_threads=2)
    try:
        want = fp.forward(batch)
        assert fp.last_threads == 2  # alone: both cores
        slot = fp._idle.get()  # the other worker is busy now
        try:
            got = fp.forward(batch)
            assert fp.last_threads == 1
        finally:
            fp._idle.put_nowait(slot)
        for g, w in zip(got, want, strict=True):  # the same numbers within float rounding
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
        fp.forward(batch)
        assert fp.last_threads == 2  # alone again
        # two at once: each gets one thread (the first may have started alone)
        seen: list[int] = []
        barrier = threading.Barrier(2)

        def both() -> None:
            barrier.wait()
            for _ in range(20):
                fp.forward(batch)
                seen.append(fp.last_threads)

        ts = [threading.Thread(target=both) for _ in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert 1 in seen
    finally:
        fp.close()
    fixed = ForwardProcess(runner, streams=2, threads=1, max_threads=2, batch_invariant=True)
    try:
        fixed.forward(batch)
        assert fixed.last_threads == 1 and fixed._threads_for_next() == 0
    finally:
        fixed.close()


@pytest.mark.parametrize(
    ("kw", "msg"),
    [({"device": "cuda"}, "CPU only"), ({"backend": "onnx"}, "torch backend")],
)
def test_config_refuses_forward_process_where_it_does_not_apply(kw, msg) -> None:
    cfg = ServerConfig(reward_models={"rm": "x"}, forward_process=True, **kw)
    with pytest.raises(ConfigError, match=msg):
        cfg.validate()
