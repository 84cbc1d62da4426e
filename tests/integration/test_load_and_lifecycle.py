"""Concurrency and lifecycle on a real server: merging, full queue, deadlines, SIGTERM drain."""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from reward_server.client import RewardClient, RewardServiceError
from tests.conftest import start_server
from tests.helpers import inprocess_scores, scrape

pytestmark = pytest.mark.integration
WORDS = "the cat dog bird fish tree river good bad big small".split()


def text(i: int, n_words: int) -> str:
    return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n_words))


def batch_stats(port: int, model: str) -> tuple[float, float]:
    m = scrape(port)
    return (
        m.get(f'reward_server_batch_size_sum{{model="{model}"}}', 0.0),
        m.get(f'reward_server_batch_size_count{{model="{model}"}}', 0.0),
    )


def test_32_concurrent_single_item_clients_get_their_own_answers_and_are_merged(
    tiny_server, tiny_ckpts
):
    pairs = [(f"q{i}", " " + text(i, 3 + i % 17)) for i in range(32)]
    expected = inprocess_scores(str(tiny_ckpts.reward), [p + c for p, c in pairs])[:, 0]
    items0, batches0 = batch_stats(tiny_server.metrics_port, "reward")
    barrier = threading.Barrier(32)
    clients = [RewardClient(tiny_server.address) for _ in range(32)]
    for c in clients:
        c.server_info()  # connect first, so the barrier releases requests, not handshakes

    def one(i: int) -> float:
        barrier.wait()
        return clients[i].score([pairs[i]])[0].score

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(one, range(32)))
    for c in clients:
        c.close()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    items1, batches1 = batch_stats(tiny_server.metrics_port, "reward")
    assert items1 - items0 == 32
    mean_batch = (items1 - items0) / (batches1 - batches0)
    assert mean_batch > 4, f"mean batch {mean_batch:.2f}: the batcher did not merge requests"


@pytest.fixture(scope="module")
def slow_ckpts(tmp_path_factory):
    """Wider models with 1024 positions, so a long batch takes a noticeable time on CPU."""
    from reward_server.tiny import build_tiny_checkpoints

    return build_tiny_checkpoints(
        tmp_path_factory.mktemp("slow"), n_layer=6, n_embd=384, n_head=6, n_positions=1024
    )


def slow_server(slow_ckpts, tmp_path, *extra: str):
    return start_server(
        [
            "--reward-model",
            str(slow_ckpts.reward),
            "--max-batch-tokens",
            "8192",
            "--max-batch-items",
            "8",
            "--max-wait-ms",
            "2",
            *extra,
        ],
        tmp_path,
        metrics=True,
    )


LONG_ITEMS = [("p", " " + text(i, 900)) for i in range(4)]


def test_full_queue_answers_resource_exhausted_and_keeps_serving(slow_ckpts, tmp_path):
    sp = slow_server(slow_ckpts, tmp_path, "--max-queue-items", "8")
    try:
        with RewardClient(sp.address, max_retries=0) as c, ThreadPoolExecutor(2) as pool:
            busy = pool.submit(c.score, LONG_ITEMS)  # occupies the worker
            time.sleep(0.3)
            queued = pool.submit(c.score, LONG_ITEMS * 2)  # 8 items wait in the queue
            time.sleep(0.3)
            with pytest.raises(RewardServiceError) as ei:
                c.score([("x", " y")])
            assert ei.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_queue_items 8" in ei.value.details
            assert len(busy.result(60)) == 4 and len(queued.result(60)) == 8
            assert len(c.score([("x", " y")])) == 1  # served again once the queue drained
        assert (
            scrape(sp.metrics_port)[
                'reward_server_dropped_items_total{model="reward",reason="queue_full"}'
            ]
            == 1
        )
    finally:
        sp.stop()


def test_expired_deadline_never_reaches_the_model(slow_ckpts, tmp_path):
    sp = slow_server(slow_ckpts, tmp_path)
    try:
        with RewardClient(sp.address, max_retries=0) as c, ThreadPoolExecutor(1) as pool:
            busy = pool.submit(c.score, LONG_ITEMS)
            time.sleep(0.2)
            t0 = time.monotonic()
            with pytest.raises(RewardServiceError) as ei:
                c.score([("late", " item")], timeout=0.3)
            assert ei.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - t0 < 2.0
            assert len(busy.result(60)) == 4
            time.sleep(0.3)
        m = scrape(sp.metrics_port)
        assert (
            m['reward_server_batch_size_sum{model="reward"}'] == 4
        )  # only the busy request's items
        dropped = sum(v for k, v in m.items() if k.startswith("reward_server_dropped_items_total"))
        assert dropped == 1
    finally:
        sp.stop()


def test_sigterm_drains_in_flight_requests_refuses_new_ones_and_exits_0(slow_ckpts, tmp_path):
    sp = slow_server(slow_ckpts, tmp_path, "--grace-seconds", "60")
    expected = inprocess_scores(str(slow_ckpts.reward), [p + c for p, c in LONG_ITEMS])[:, 0]
    try:
        with (
            RewardClient(sp.address, max_retries=0, timeout=120) as c,
            ThreadPoolExecutor(4) as pool,
        ):
            inflight = [pool.submit(c.score, LONG_ITEMS) for _ in range(4)]
            time.sleep(0.5)
            sp.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            with pytest.raises(RewardServiceError) as ei:
                c.score([("new", " request")])
            assert ei.value.code == grpc.StatusCode.UNAVAILABLE
            for f in inflight:
                np.testing.assert_allclose([r.score for r in f.result(120)], expected, atol=1e-4)
        assert sp.proc.wait(60) == 0
        log = sp.log()
        assert "draining" in log and "stopped" in log
    finally:
        sp.stop()
