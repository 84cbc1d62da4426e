"""One bad item must not cost the whole batch: send the batch, and if the server rejects it as a
whole, send the items one by one and keep the answers of those it accepts.

The server validates a request before scoring any of it, so one empty completion or one
conversation its chat template refuses fails the whole request with INVALID_ARGUMENT (docs/API.md,
status codes). Callers that would rather lose that one item than the batch (the PPO trainer's
`policy_trainer.remote`, the TRL and veRL integrations) use `batch_or_per_item` (blocking) or
`abatch_or_per_item` (asyncio); both faces run the same steps, as the client core's do.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import grpc

from reward_server.client.retry import RewardServiceError

log = logging.getLogger("reward_server.client")
R = TypeVar("R")

PER_ITEM = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL})
"""Codes that may come from one bad item: the batch is retried item by item."""


@dataclass
class ItemResults(Generic[R]):
    """The answer for each item (None where the server rejected it) and the rejections."""

    results: list[R | None]
    rejected: dict[int, RewardServiceError] = field(default_factory=dict)
    """Index of each rejected item -> the error the server gave for it alone."""

    @property
    def all_rejected(self) -> bool:
        """Every item of a batch of two or more was rejected: the server, not the items (a wrong
        model name, a model without a chat template), is the likely problem."""
        return len(self.results) > 1 and len(self.rejected) == len(self.results)


Steps = Generator[slice, "list[Any] | RewardServiceError", ItemResults[Any]]


def _steps(n: int, what: str) -> Steps:
    """Yield the slices to send; receive each call's results or its PER_ITEM error."""
    out = yield slice(0, n)
    if not isinstance(out, RewardServiceError):
        return ItemResults(list(out))
    if n == 1:  # the batch was the item
        log.warning("%s: item 0 left out (%s: %s)", what, out.code.name, out.details)
        return ItemResults([None], {0: out})
    log.warning(
        "%s: batch of %d rejected (%s: %s); retrying item by item",
        what,
        n,
        out.code.name,
        out.details,
    )
    results: list[Any] = []
    rejected: dict[int, RewardServiceError] = {}
    for i in range(n):
        one = yield slice(i, i + 1)
        if isinstance(one, RewardServiceError):
            log.warning("%s: item %d left out (%s: %s)", what, i, one.code.name, one.details)
            rejected[i] = one
            results.append(None)
        else:
            results.extend(one)
    return ItemResults(results, rejected)


def batch_or_per_item(
    n: int, call: Callable[[slice], list[R]], what: str = "Score"
) -> ItemResults[R]:
    """``call(slice(0, n))``; if it raises `RewardServiceError` with a `PER_ITEM` code, each item
    alone, with None for the items still rejected. Other errors propagate."""
    steps = _steps(n, what)
    try:
        sl = next(steps)
        while True:
            try:
                out: list[Any] | RewardServiceError = list(call(sl))
            except RewardServiceError as err:
                if err.code not in PER_ITEM:
                    raise
                out = err
            sl = steps.send(out)
    except StopIteration as stop:
        return stop.value


async def abatch_or_per_item(
    n: int, call: Callable[[slice], Awaitable[list[R]]], what: str = "Score"
) -> ItemResults[R]:
    """`batch_or_per_item` for a coroutine ``call``."""
    steps = _steps(n, what)
    try:
        sl = next(steps)
        while True:
            try:
                out: list[Any] | RewardServiceError = list(await call(sl))
            except RewardServiceError as err:
                if err.code not in PER_ITEM:
                    raise
                out = err
            sl = steps.send(out)
    except StopIteration as stop:
        return stop.value
