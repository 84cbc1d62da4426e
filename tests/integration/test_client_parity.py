"""The blocking and asyncio clients behave the same on every public method (real servers)."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest

from reward_server.client import API, AsyncRewardClient, RewardClient, RewardServiceError
from tests.conftest import free_port
from tests.helpers import inprocess_logprobs, inprocess_scores

pytestmark = pytest.mark.integration

WORDS = "the cat dog bird fish tree river good bad big".split()
PAIRS = [(f"p{i}", " " + " ".join(WORDS[: 1 + i % 10])) for i in range(150)]  # 3 requests of <=64
CHATS = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": " the cat"}]] * 3
SEQS = [[5 + (i % 50), 6, 7, 8 + i % 9, 9] for i in range(70)]


def both(
    address: str,
    call: Callable[[Any], Any],
    call_async: Callable[[Any], Any] | None = None,
    **client_kwargs: Any,
) -> list[tuple[Any, float]]:
    """`call(client)` on a RewardClient and `call_async(client)` (default: `call`, awaited) on an
    AsyncRewardClient: for each, the result or the RewardServiceError raised, and the seconds."""

    def blocking() -> tuple[Any, float]:
        t0 = time.monotonic()
        with RewardClient(address, **client_kwargs) as c:
            try:
                out = call(c)
            except RewardServiceError as e:
                out = e
        return out, time.monotonic() - t0

    async def aio() -> tuple[Any, float]:
        t0 = time.monotonic()
        async with AsyncRewardClient(address, **client_kwargs) as c:
            try:
                out = await (call_async or call)(c)
            except RewardServiceError as e:
                out = e
        return out, time.monotonic() - t0

    return [blocking(), asyncio.run(aio())]


def dead_address() -> str:
    return f"127.0.0.1:{free_port()}"  # nothing listens there


def test_the_two_faces_have_the_same_methods_and_signatures():
    public = {n for n in dir(RewardClient) if not n.startswith("_")}
    assert public == {n for n in dir(AsyncRewardClient) if not n.startswith("_")}
    assert public == {*API, "close", "targets"}
    for name in [*API, "close"]:
        sync, aio = getattr(RewardClient, name), getattr(AsyncRewardClient, name)
        assert inspect.signature(sync) == inspect.signature(aio), name
        assert sync.__doc__ and sync.__doc__ == aio.__doc__ or name == "close", name
        assert inspect.iscoroutinefunction(aio) and not inspect.iscoroutinefunction(sync), name
    assert inspect.signature(RewardClient) == inspect.signature(AsyncRewardClient)
    assert inspect.signature(RewardClient.score).return_annotation != inspect.Signature.empty


def test_same_results_with_splitting(tiny_server, tiny_ckpts):
    def everything(c):
        return (
            c.score(PAIRS),
            c.score_messages(CHATS),
            c.reference_logprobs(SEQS, [2] * 70, 0.8),
            c.server_info(),
            c.health(),
        )

    async def everything_async(c):
        return (
            await c.score(PAIRS),
            await c.score_messages(CHATS),
            await c.reference_logprobs(SEQS, [2] * 70, 0.8),
            await c.server_info(),
            await c.health(),
        )

    (sync, _), (aio, _) = both(tiny_server.address, everything, everything_async)
    assert sync[3] == aio[3] and sync[3].max_items_per_request == 64
    assert sync[4] == aio[4] == "SERVING"
    for got in (sync, aio):
        assert len(got[0]) == 150 and len(got[1]) == 3 and len(got[2]) == 70
    # equal up to batching (the server may batch the two faces' requests differently)
    np.testing.assert_allclose([r.score for r in sync[0]], [r.score for r in aio[0]], atol=1e-5)
    assert [r.num_tokens for r in sync[0]] == [r.num_tokens for r in aio[0]]
    np.testing.assert_allclose([r.score for r in sync[1]], [r.score for r in aio[1]], atol=1e-5)
    for a, b in zip(sync[2], aio[2], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # the split parts came back in input order: the last request's items match in-process
    idx = [0, 63, 64, 127, 128, 149]
    expected = inprocess_scores(str(tiny_ckpts.reward), [PAIRS[i][0] + PAIRS[i][1] for i in idx])
    np.testing.assert_allclose([sync[0][i].score for i in idx], expected[:, 0], atol=1e-5)
    last = [SEQS[i] for i in (0, 64, 69)]
    for got, exp in zip(
        [sync[2][i] for i in (0, 64, 69)],
        inprocess_logprobs(str(tiny_ckpts.reference), last, [2] * 3, 0.8),
        strict=True,
    ):
        np.testing.assert_allclose(got, exp, atol=1e-5)


@pytest.mark.parametrize(
    "call, code",
    [
        (lambda c: c.score([("p", "")]), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda c: c.score([("p", " c")], model="nope"), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda c: c.reference_logprobs([[5, 99999]], [1]), grpc.StatusCode.INVALID_ARGUMENT),
        (
            lambda c: c.reference_logprobs([[5, 6, 7]], [1], tokenizer_fingerprint="other"),
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
    ],
)
def test_same_error_codes_for_bad_requests(tiny_server, call, code):
    results = both(tiny_server.address, call)
    for err, _ in results:
        assert isinstance(err, RewardServiceError) and err.code == code, err
    assert results[0][0].details == results[1][0].details


def test_health_and_readiness_look_at_every_address(tiny_server):
    up, down = tiny_server.address, dead_address()
    for address in (f"{up},{down}", f"{down},{up}"):
        results = both(address, lambda c: c.health(timeout=2))
        assert [r for r, _ in results] == ["UNAVAILABLE", "UNAVAILABLE"], address
        results = both(address, lambda c: c.wait_until_ready(timeout=1.0))
        for err, seconds in results:
            assert isinstance(err, RewardServiceError), address  # the async face used to pass
            assert err.code == grpc.StatusCode.UNAVAILABLE and 0.9 < seconds < 10
    results = both(f"{up},{up}", lambda c: c.health())
    assert [r for r, _ in results] == ["SERVING", "SERVING"]
    assert [r for r, _ in both(f"{up},{up}", lambda c: c.wait_until_ready(5))] == [None, None]


def test_failover_to_the_second_address(tiny_server):
    down = dead_address()

    def four_calls(c):
        return [c.score([PAIRS[i]])[0].score for i in range(4)]  # both round-robin positions

    async def four_calls_async(c):
        return [(await c.score([PAIRS[i]]))[0].score for i in range(4)]

    with RewardClient(tiny_server.address) as c:
        direct = four_calls(c)
    (sync, _), (aio, _) = both(
        f"{down},{tiny_server.address}", four_calls, four_calls_async, max_retries=2
    )
    np.testing.assert_allclose(sync, direct, atol=1e-5)
    np.testing.assert_allclose(aio, direct, atol=1e-5)


def test_deadline_passes_the_same_way(tiny_server):
    many = PAIRS * 4
    for err, seconds in both(tiny_server.address, lambda c: c.score(many, timeout=0.002)):
        assert isinstance(err, RewardServiceError) and seconds < 5
        assert err.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_budget_gives_up_after_the_budget():
    kwargs = {"timeout": 0.5, "max_retries": 1, "budget_seconds": 3.0}
    for err, seconds in both(dead_address(), lambda c: c.score(PAIRS[:2]), **kwargs):
        assert isinstance(err, RewardServiceError) and err.code == grpc.StatusCode.UNAVAILABLE
        assert "retry budget of 3s spent" in err.details
        assert 2.9 < seconds < 8  # kept trying (waiting for SERVING) for the budget, then stopped
    for err, seconds in both(dead_address(), lambda c: c.score(PAIRS[:2])):
        # no budget: gRPC's own retries (at most 5 attempts, backoff 0.05 s doubling), then stop
        # (GetServerInfo for the server's limit, then Score: two calls of at most 0.75 s backoff)
        assert err.code == grpc.StatusCode.UNAVAILABLE and seconds < 2.5
        assert "gave up after 5 attempt(s)" in err.details
