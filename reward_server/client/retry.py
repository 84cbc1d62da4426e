"""When a failed call is tried again, where, after how long, and when the client gives up.

Pure bookkeeping (no I/O): the client core asks `CallState.after_failure` what follows a failed
attempt and either gets a `Retry` or a `RewardServiceError`. Which of this gRPC does itself and
which is done here is described in docs/ARCHITECTURE.md ("The client layer").
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

log = logging.getLogger("reward_server.client")

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
"""Codes that mean "not now, maybe elsewhere": the server is down, loading, draining or full."""
GRPC_MAX_ATTEMPTS = 5
"""gRPC clamps a service config's ``retryPolicy.maxAttempts`` to 5 (gRFC A6)."""


class ReplicaLog:
    """What a client logs while replicas fail, without a line per failed call (thousands a
    second under load): one WARNING when a replica starts failing, one when it answers again,
    and between the two at most one summary line every `interval` seconds. Each failed attempt
    is also logged at DEBUG. Thread-safe (one per client, shared by its calls)."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        self._down: dict[str, list[Any]] = {}  # name -> [since, failures, last code, last detail]
        self._summarised = time.monotonic()

    def failure(self, name: str, code: grpc.StatusCode, details: str) -> None:
        """A retryable failure of an attempt on replica `name`."""
        log.debug("attempt on %s failed with %s (%s)", name, code.name, details)
        now = time.monotonic()
        with self._lock:
            st = self._down.get(name)
            if st is None:
                self._down[name] = [now, 1, code.name, details]
                log.warning(
                    "replica %s is failing: %s (%s); retrying elsewhere or later, further "
                    "failures summarised every %gs",
                    name, code.name, details, self.interval,
                )  # fmt: skip
            else:
                st[1] += 1
                st[2], st[3] = code.name, details
                self._maybe_summarise(now)

    def success(self, name: str) -> None:
        """An attempt on replica `name` was answered."""
        if name not in self._down:  # the common case, without the lock
            return
        with self._lock:
            st = self._down.pop(name, None)
            if st is not None:
                log.warning(
                    "replica %s answers again (%d failed attempt(s) over %.1fs)",
                    name, st[1], time.monotonic() - st[0],
                )  # fmt: skip

    def _maybe_summarise(self, now: float) -> None:
        if now - self._summarised < self.interval:
            return
        self._summarised = now
        parts = [
            f"{name}: {st[1]} failed attempt(s) over {now - st[0]:.0f}s (last: {st[2]})"
            for name, st in self._down.items()
        ]
        if parts:
            log.warning("replicas still failing: %s", "; ".join(parts))

    @property
    def failing(self) -> list[str]:
        """Replicas whose last attempt failed."""
        with self._lock:
            return list(self._down)


class RewardServiceError(Exception):
    """A call failed for good (after retries, or with a code that is not retried)."""

    def __init__(self, code: grpc.StatusCode, details: str, method: str = "") -> None:
        super().__init__(
            f"{method}: {code.name}: {details}" if method else f"{code.name}: {details}"
        )
        self.code = code
        self.details = details
        self.method = method


@dataclass(frozen=True, slots=True)
class Failure:
    """The status of one failed attempt."""

    code: grpc.StatusCode
    details: str


@dataclass(frozen=True, slots=True)
class Retry:
    """What follows a failed attempt: sleep, optionally wait for SERVING, try `target` again."""

    delay: float
    target: int
    wait_serving_until: float | None = None


@dataclass
class RetryPolicy:
    """Retries, backoff, the total time budget and the choice of address for one client.

    With one address (a host:port or a name such as ``dns:///svc:50051`` that gRPC resolves and
    balances round-robin), the retries of a call happen inside gRPC (the channel's service config,
    see `service_config_retry`). With several addresses (``"h1:p,h2:p"``: one channel each), each
    retry goes to the next address, here. Without a budget a call ends at its deadline
    (``timeout``, retries included). With ``budget_seconds``, a call whose attempts all failed with
    a retryable code (or DEADLINE_EXCEEDED) starts a new round with a fresh ``timeout`` until the
    budget is spent; with one address it first waits for the health service to say SERVING, so a
    restarting server is not sent work before its models are loaded.
    """

    targets: int = 1
    """How many channels (addresses of a comma list) the client has."""
    timeout: float = 30.0
    """Deadline of a call in seconds, its retries included (of one round, with a budget)."""
    max_retries: int = 5
    """Retries after the first attempt (gRPC caps the attempts within a channel at 5)."""
    backoff_base: float = 0.05
    """First backoff in seconds; doubled on each retry."""
    backoff_max: float = 2.0
    """Longest backoff in seconds (before jitter)."""
    budget_seconds: float | None = None
    """Total time to keep retrying a call across rounds; None: the call's deadline only."""
    retryable: frozenset[grpc.StatusCode] = RETRYABLE
    """Codes that are retried (with a budget, DEADLINE_EXCEEDED of a round too)."""
    replicas: ReplicaLog = field(default_factory=ReplicaLog, compare=False, repr=False)
    """Logs replica failures and recoveries once, not once per failed call."""
    _rr: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._rr = itertools.cycle(range(max(1, self.targets)))

    def pick(self) -> int:
        """The channel for a new call (round-robin)."""
        return next(self._rr)

    def backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter: uniform in [0.5, 1.5) x the step."""
        return min(self.backoff_max, self.backoff_base * (2**attempt)) * random.uniform(0.5, 1.5)

    def service_config_retry(self) -> dict[str, Any] | None:
        """The ``retryPolicy`` for the channel's service config, or None where the retries are
        ours (several channels, or no retries at all)."""
        if self.targets != 1 or self.max_retries <= 0:
            return None
        return {
            "maxAttempts": min(GRPC_MAX_ATTEMPTS, self.max_retries + 1),
            "initialBackoff": f"{self.backoff_base:.3f}s",
            "maxBackoff": f"{self.backoff_max:.3f}s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": sorted(c.name for c in self.retryable),
        }

    @property
    def channel_attempts(self) -> int:
        """Attempts gRPC makes within a channel for one call (its ``maxAttempts``)."""
        retry = self.service_config_retry()
        return 1 if retry is None else int(retry["maxAttempts"])

    def start(
        self,
        method: str,
        target_names: Sequence[str],
        *,
        timeout: float | None = None,
        budget: bool = True,
    ) -> CallState:
        """Bookkeeping for one call (``timeout`` overrides the policy's for its first round;
        ``budget=False``: no retry budget for this call)."""
        return CallState(
            self, method, target_names, timeout, budget and self.budget_seconds is not None
        )


class CallState:
    """The retry state of one call: attempts, rounds, deadlines."""

    __slots__ = ("policy", "method", "names", "budget", "start", "deadline", "retries", "rounds")

    def __init__(
        self,
        policy: RetryPolicy,
        method: str,
        names: Sequence[str],
        timeout: float | None,
        budget: bool,
    ) -> None:
        self.policy, self.method, self.names, self.budget = policy, method, names, budget
        self.start = time.monotonic()
        self.deadline: float | None = self.start + (timeout or policy.timeout)
        self.retries = 0
        self.rounds = 0

    def remaining(self) -> float:
        """Seconds left before this round's deadline."""
        if self.deadline is None:  # a new round starts with the next attempt
            self.deadline = time.monotonic() + self.policy.timeout
        return self.deadline - time.monotonic()

    def after_failure(self, failures: Sequence[tuple[int, Failure]]) -> Retry:
        """What follows failed attempts ((target, failure) pairs of one call): a `Retry`, or
        `RewardServiceError` for the first failure that is final."""
        pol = self.policy
        for _, f in failures:
            if f.code not in pol.retryable and not (
                self.budget and f.code == grpc.StatusCode.DEADLINE_EXCEEDED
            ):
                raise RewardServiceError(f.code, f.details, self.method) from None
        for t, f in failures:
            pol.replicas.failure(self.names[t], f.code, f.details)
        target, f = failures[0]
        nxt = (target + 1) % len(self.names)
        left = self.remaining()
        if pol.targets > 1 and self.retries < pol.max_retries and left > 0:
            self.retries += 1
            delay = min(pol.backoff(self.retries - 1), max(0.0, left - 0.01))
            log.debug(
                "%s to %s failed with %s (%s); retry %d/%d on %s in %.2fs",
                self.method, self.names[target], f.code.name, f.details, self.retries,
                pol.max_retries, self.names[nxt], delay,
            )  # fmt: skip
            return Retry(delay, nxt)
        if self.budget:
            assert pol.budget_seconds is not None
            elapsed = time.monotonic() - self.start
            delay = pol.backoff(self.rounds)
            if elapsed + delay <= pol.budget_seconds:
                self.rounds += 1
                self.retries = 0
                self.deadline = None
                log.debug(
                    "%s to %s failed with %s (%s); %.1fs of the %gs retry budget spent, next "
                    "round on %s in %.2fs",
                    self.method, self.names[target], f.code.name, f.details, elapsed,
                    pol.budget_seconds, self.names[nxt], delay,
                )  # fmt: skip
                until = self.start + pol.budget_seconds if len(self.names) == 1 else None
                return Retry(delay, nxt, until)
            raise RewardServiceError(
                f.code,
                f"{f.details} (gave up after {elapsed:.1f}s: retry budget of "
                f"{pol.budget_seconds:g}s spent)",
                self.method,
            ) from None
        if f.code == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise RewardServiceError(f.code, f.details, self.method) from None
        attempts = self.retries + 1 if pol.targets > 1 else pol.channel_attempts
        raise RewardServiceError(
            f.code, f"{f.details} (gave up after {attempts} attempt(s))", self.method
        ) from None
