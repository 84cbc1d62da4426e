"""The client's replica log: one WARNING when a replica starts failing, one when it answers
again, and at most one summary per interval in between, however many calls fail."""

from __future__ import annotations

import logging
import time

import grpc

from reward_server.client.retry import ReplicaLog

UNAV = grpc.StatusCode.UNAVAILABLE


def test_thousands_of_failures_make_a_few_lines(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="reward_server.client")
    rl = ReplicaLog(interval=0.05)
    t_end = time.monotonic() + 0.25
    n = 0
    while time.monotonic() < t_end:
        rl.failure("a:1", UNAV, "connection refused")
        n += 1
    rl.success("b:2")  # never failed: nothing to say
    assert rl.failing == ["a:1"]
    rl.success("a:1")
    lines = [r.getMessage() for r in caplog.records]
    assert n > 1000
    assert lines[0].startswith("replica a:1 is failing: UNAVAILABLE (connection refused)")
    summaries = [m for m in lines if m.startswith("replicas still failing: a:1:")]
    assert 1 <= len(summaries) <= 6  # one per 0.05 s interval over 0.25 s, at most
    assert lines[-1].startswith(f"replica a:1 answers again ({n} failed attempt(s)")
    assert len(lines) == 2 + len(summaries) and rl.failing == []
    rl.failure("a:1", UNAV, "again")  # a new outage is announced again
    assert caplog.records[-1].getMessage().startswith("replica a:1 is failing")
