"""`reward_server.client.per_item`: the item-by-item retry, both drivers (the same steps)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from reward_server.client import RewardServiceError, abatch_or_per_item, batch_or_per_item

BAD = {1, 3}


def _sync_call(sent: list[slice]):
    def call(sl: slice) -> list[int]:
        sent.append(sl)
        items = range(sl.start, sl.stop)
        if BAD & set(items):
            raise RewardServiceError(
                grpc.StatusCode.INVALID_ARGUMENT, f"item {min(BAD & set(items))}"
            )
        return [10 * i for i in items]

    return call


def _run(n: int, asynchronous: bool, call):
    if not asynchronous:
        return batch_or_per_item(n, call)

    async def acall(sl: slice) -> list[int]:
        return call(sl)

    return asyncio.run(abatch_or_per_item(n, acall))


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_rejected_batch_is_retried_item_by_item(asynchronous: bool) -> None:
    sent: list[slice] = []
    out = _run(5, asynchronous, _sync_call(sent))
    assert out.results == [0, None, 20, None, 40]
    assert sorted(out.rejected) == [1, 3] and out.rejected[3].details == "item 3"
    assert sent == [slice(0, 5)] + [slice(i, i + 1) for i in range(5)]
    assert not out.all_rejected


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_good_batch_is_one_call_and_one_bad_item_is_not_resent(asynchronous: bool) -> None:
    sent: list[slice] = []
    assert _run(1, asynchronous, _sync_call(sent)).results == [0]
    sent.clear()
    single_bad = _sync_call(sent)
    out = _run(1, asynchronous, lambda sl: single_bad(slice(1, 2)))
    assert out.results == [None] and len(sent) == 1 and not out.all_rejected


@pytest.mark.parametrize("asynchronous", [False, True])
def test_other_codes_propagate_and_all_rejected_is_reported(asynchronous: bool) -> None:
    def unavailable(sl: slice) -> list[int]:
        raise RewardServiceError(grpc.StatusCode.UNAVAILABLE, "down")

    with pytest.raises(RewardServiceError, match="down"):
        _run(3, asynchronous, unavailable)

    def invalid(sl: slice) -> list[int]:
        raise RewardServiceError(grpc.StatusCode.INVALID_ARGUMENT, "unknown model")

    out = _run(3, asynchronous, invalid)
    assert out.all_rejected and out.results == [None, None, None]
