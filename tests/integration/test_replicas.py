"""Two server replicas behind one client; one is SIGKILLed mid-load."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from reward_server.client import RewardClient
from tests.conftest import start_server
from tests.helpers import inprocess_scores

pytestmark = pytest.mark.integration


def test_sigkill_one_replica_mid_load_every_request_completes_once(tiny_ckpts, tmp_path, caplog):
    args = ["--reward-model", str(tiny_ckpts.reward), "--max-wait-ms", "2"]
    a = start_server(args, tmp_path)
    b = start_server(args, tmp_path)
    words = "the cat dog bird fish tree river good bad big small".split()
    pairs = [
        (f"q{i}", " " + " ".join(words[(i + k) % len(words)] for k in range(2 + i % 30)))
        for i in range(240)
    ]
    expected = inprocess_scores(str(tiny_ckpts.reward), [p + c for p, c in pairs])[:, 0]
    done = []
    lock = threading.Lock()
    killed = threading.Event()
    try:
        client = RewardClient(f"{a.address},{b.address}", timeout=30, max_retries=8)
        assert client.targets == [a.address, b.address]

        def one(i: int) -> tuple[int, float]:
            score = client.score([pairs[i]])[0].score
            with lock:
                done.append(i)
                if len(done) == 60 and not killed.is_set():
                    killed.set()
                    a.proc.kill()  # SIGKILL mid-load
            return i, score

        caplog.set_level(logging.DEBUG, logger="reward_server.client")
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(len(pairs))))
        client.close()
    finally:
        a.stop()
        b.stop()
    assert killed.is_set() and a.proc.returncode == -9
    assert sorted(i for i, _ in results) == list(range(len(pairs)))  # each exactly once
    np.testing.assert_allclose([s for _, s in results], expected, atol=1e-5)
    retries = [
        r.getMessage() for r in caplog.records if "failed with UNAVAILABLE" in r.getMessage()
    ]
    assert retries, "the client should log the failed attempts (DEBUG)"
    assert all(f"on {b.address}" in m for m in retries if f"to {a.address}" in m)
    # ... but only a line per replica state change at WARNING, not one per failed call
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name == "reward_server.client"
    ]
    assert sum(f"replica {a.address} is failing" in m for m in warnings) == 1, warnings
    assert len(warnings) <= 3 < len(retries), (len(warnings), len(retries))
