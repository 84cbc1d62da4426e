"""Client library for the reward service. Imports grpcio, protobuf and numpy only (no torch).

`RewardClient` (blocking) and `AsyncRewardClient` (asyncio) share one retry policy:

- every call has a deadline (``timeout`` seconds, retries included);
- UNAVAILABLE and RESOURCE_EXHAUSTED are retried with jittered exponential backoff, each retry on
  the next address; no other code is retried;
- several addresses (``"h1:p,h2:p"``) are used round-robin; ``dns:///name:port`` resolves to every
  address of the name and uses gRPC's round_robin balancing (a headless Kubernetes Service);
- batches larger than the server's advertised ``max_items_per_request`` are split and the parts
  sent concurrently; results come back in input order.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from reward_server.api.rlhf.v1 import reward_service_pb2 as pb
from reward_server.api.rlhf.v1 import reward_service_pb2_grpc as pb_grpc

log = logging.getLogger("reward_server.client")
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
_TRUNC = {
    "": pb.TRUNCATION_UNSPECIFIED,
    "error": pb.TRUNCATION_ERROR,
    "left": pb.TRUNCATION_LEFT,
    "right": pb.TRUNCATION_RIGHT,
}
DEFAULT_CHUNK = 256


class RewardServiceError(Exception):
    """A call failed for good (after retries, or with a code that is not retried)."""

    def __init__(self, code: grpc.StatusCode, details: str, method: str = "") -> None:
        super().__init__(
            f"{method}: {code.name}: {details}" if method else f"{code.name}: {details}"
        )
        self.code = code
        self.details = details
        self.method = method


@dataclass
class ScoreResult:
    """The score of one item (raw: no sigmoid)."""

    score: float
    head_scores: dict[str, float]
    num_tokens: int
    truncated: bool
    normalized_score: float | None = None


PairLike = tuple[str, str] | dict[str, Any]


# ---------------------------------------------------------------------------- shared pieces
def split_targets(address: str) -> list[str]:
    """``"h1:p,h2:p"`` -> two targets; ``dns:///...`` and other URIs stay one target."""
    address = address.strip()
    if not address:
        raise ValueError("empty server address")
    if "://" in address or address.startswith(("ipv4:", "ipv6:", "unix:")):
        return [address]
    return [a.strip() for a in address.split(",") if a.strip()]


def channel_options(max_message_mb: int = 64) -> list[tuple[str, Any]]:
    """Message limits and round_robin balancing over every address a target resolves to."""
    size = max_message_mb << 20
    return [
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
        ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})),
        ("grpc.enable_retries", 0),  # retries are ours (logged, deadline-bounded)
    ]


def credentials(
    tls_ca: str | None, tls_cert: str | None, tls_key: str | None
) -> grpc.ChannelCredentials | None:
    """TLS channel credentials (mutual TLS when a client certificate is given), or None."""
    if not (tls_ca or tls_cert):
        return None
    read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
    return grpc.ssl_channel_credentials(read(tls_ca), read(tls_key), read(tls_cert))


def score_items(pairs: Iterable[PairLike]) -> list[pb.ScoreItem]:
    """(prompt, completion) tuples or dicts with prompt/completion or messages -> ScoreItem."""
    items = []
    for p in pairs:
        if isinstance(p, dict):
            if p.get("messages"):
                items.append(
                    pb.ScoreItem(
                        messages=[
                            pb.ChatMessage(role=m["role"], content=m["content"])
                            for m in p["messages"]
                        ]
                    )
                )
            else:
                items.append(
                    pb.ScoreItem(prompt=p.get("prompt", ""), completion=p.get("completion", ""))
                )
        else:
            prompt, completion = p
            items.append(pb.ScoreItem(prompt=prompt, completion=completion))
    return items


def message_items(conversations: Iterable[Sequence[dict[str, str]]]) -> list[pb.ScoreItem]:
    """Chat conversations (lists of role/content dicts) -> ScoreItem."""
    return [
        pb.ScoreItem(messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in conv])
        for conv in conversations
    ]


def parse_scores(resp: pb.ScoreResponse) -> list[ScoreResult]:
    """ScoreResponse -> ScoreResult list."""
    return [
        ScoreResult(
            s.score,
            dict(s.head_scores),
            s.num_tokens,
            s.truncated,
            s.normalized_score if s.has_normalized_score else None,
        )
        for s in resp.scores
    ]


def chunks(n: int, size: int) -> list[tuple[int, int]]:
    """[start, end) ranges covering n items in pieces of at most `size`."""
    return [(a, min(n, a + size)) for a in range(0, n, max(1, size))]


def ref_request(
    token_ids: Sequence[Sequence[int]],
    response_starts: Sequence[int],
    temperature: float,
    model: str,
    fingerprint: str | None,
) -> pb.ReferenceLogProbsRequest:
    """Build a ReferenceLogProbsRequest."""
    if len(token_ids) != len(response_starts):
        raise ValueError(f"{len(token_ids)} sequences but {len(response_starts)} response_starts")
    return pb.ReferenceLogProbsRequest(
        model=model,
        temperature=temperature,
        tokenizer_fingerprint=fingerprint or "",
        sequences=[
            pb.TokenSequence(token_ids=list(map(int, t)), response_start=int(s))
            for t, s in zip(token_ids, response_starts, strict=True)
        ],
    )


def ref_requests(
    token_ids: Sequence[Sequence[int]],
    response_starts: Sequence[int],
    temperature: float,
    model: str,
    fingerprint: str | None,
    size: int,
) -> list[pb.ReferenceLogProbsRequest]:
    """ReferenceLogProbsRequests of at most `size` sequences each."""
    if len(token_ids) != len(response_starts):
        raise ValueError(f"{len(token_ids)} sequences but {len(response_starts)} response_starts")
    return [
        ref_request(token_ids[a:b], response_starts[a:b], temperature, model, fingerprint)
        for a, b in chunks(len(token_ids), size)
    ]


def score_requests(
    items: list[pb.ScoreItem], model: str, truncation: str, size: int
) -> list[pb.ScoreRequest]:
    """ScoreRequests of at most `size` items each."""
    return [
        pb.ScoreRequest(model=model, items=items[a:b], truncation=_TRUNC[truncation])
        for a, b in chunks(len(items), size)
    ]


def parse_logprobs(responses: Iterable[pb.ReferenceLogProbsResponse]) -> list[np.ndarray]:
    """Each sequence's log-probs (float32), in order, from the responses of `ref_requests`."""
    return [np.asarray(r.logprobs, dtype=np.float32) for resp in responses for r in resp.results]


class _Policy:
    """Retry/backoff bookkeeping shared by both clients."""

    def __init__(
        self,
        targets: list[str],
        timeout: float,
        max_retries: int,
        backoff_base: float,
        backoff_max: float,
        token: str | None,
    ):
        self.targets = targets
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        token = token if token is not None else os.environ.get("RLHF_AUTH_TOKEN")
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._rr = itertools.cycle(range(len(targets)))
        self.max_items: int | None = None

    def next_index(self) -> int:
        return next(self._rr)

    def backoff(self, attempt: int) -> float:
        """Exponential backoff with full jitter in [0.5, 1.5) x the step."""
        return min(self.backoff_max, self.backoff_base * (2**attempt)) * random.uniform(0.5, 1.5)

    def on_error(
        self, method: str, err: grpc.RpcError, attempt: int, idx: int, deadline: float
    ) -> tuple[float, int]:
        """Decide what follows a failed attempt: (sleep seconds, next target index), or raise."""
        code = err.code()
        details = err.details() or ""
        if code not in RETRYABLE:
            raise RewardServiceError(code, details, method) from None
        remaining = deadline - time.monotonic()
        if attempt >= self.max_retries or remaining <= 0:
            raise RewardServiceError(
                code, f"{details} (gave up after {attempt + 1} attempt(s))", method
            ) from None
        nxt = (idx + 1) % len(self.targets)
        delay = min(self.backoff(attempt), max(0.0, remaining - 0.01))
        log.warning(
            "%s to %s failed with %s (%s); retry %d/%d on %s in %.2fs",
            method,
            self.targets[idx],
            code.name,
            details,
            attempt + 1,
            self.max_retries,
            self.targets[nxt],
            delay,
        )
        return delay, nxt


# ---------------------------------------------------------------------------- shared setup
class _ClientBase:
    """Channels, stubs and the retry policy; the blocking and asyncio clients differ only in how
    they call."""

    _channel_module: Any = grpc  # grpc (blocking) or grpc.aio

    def __init__(
        self,
        address: str,
        *,
        timeout: float = 30.0,
        max_retries: int = 5,
        backoff_base: float = 0.05,
        backoff_max: float = 2.0,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        token: str | None = None,
        max_message_mb: int = 64,
    ) -> None:
        targets = split_targets(address)
        self._policy = _Policy(targets, timeout, max_retries, backoff_base, backoff_max, token)
        creds = credentials(tls_ca, tls_cert, tls_key)
        opts = channel_options(max_message_mb)
        mod = self._channel_module
        self._channels = [
            mod.secure_channel(t, creds, opts) if creds else mod.insecure_channel(t, opts)
            for t in targets
        ]
        self._stubs = [pb_grpc.RewardServiceStub(c) for c in self._channels]
        self._health = [health_pb2_grpc.HealthStub(c) for c in self._channels]

    @property
    def targets(self) -> list[str]:
        """The addresses this client balances over."""
        return list(self._policy.targets)


# ---------------------------------------------------------------------------- blocking client
class RewardClient(_ClientBase):
    """Blocking client. Thread-safe; reuse one per process."""

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close every channel."""
        for c in self._channels:
            c.close()

    # -------------------------------------------------------------- core
    def _call(
        self, method: str, request: Any, deadline: float, first: Any = None, idx: int | None = None
    ) -> Any:
        pol = self._policy
        idx = pol.next_index() if idx is None else idx
        attempt = 0
        while True:
            try:
                if first is not None:
                    fut, first = first, None
                    return fut.result()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RewardServiceError(
                        grpc.StatusCode.DEADLINE_EXCEEDED, "client deadline passed", method
                    )
                return getattr(self._stubs[idx], method)(
                    request, timeout=remaining, metadata=pol.metadata
                )
            except grpc.RpcError as err:
                delay, idx = pol.on_error(method, err, attempt, idx, deadline)
                attempt += 1
                time.sleep(delay)

    def _chunked(self, method: str, requests: list[Any], timeout: float | None) -> list[Any]:
        deadline = time.monotonic() + (timeout or self._policy.timeout)
        if len(requests) == 1:
            return [self._call(method, requests[0], deadline)]
        firsts = []
        for req in requests:  # send every part at once, then collect (retrying failures)
            idx = self._policy.next_index()
            fut = getattr(self._stubs[idx], method).future(
                req, timeout=max(0.001, deadline - time.monotonic()), metadata=self._policy.metadata
            )
            firsts.append((fut, idx))
        return [
            self._call(method, req, deadline, fut, idx)
            for req, (fut, idx) in zip(requests, firsts, strict=True)
        ]

    def _max_items(self) -> int:
        if self._policy.max_items is None:
            try:
                self._policy.max_items = (
                    int(self.server_info().max_items_per_request) or DEFAULT_CHUNK
                )
            except RewardServiceError:
                return DEFAULT_CHUNK
        return self._policy.max_items

    # -------------------------------------------------------------- API
    def score(
        self,
        pairs: Sequence[PairLike],
        *,
        model: str = "",
        truncation: str = "",
        timeout: float | None = None,
    ) -> list[ScoreResult]:
        """Score (prompt, completion) pairs (or dicts); results in input order."""
        return self._score(score_items(pairs), model, truncation, timeout)

    def score_messages(
        self,
        conversations: Sequence[Sequence[dict[str, str]]],
        *,
        model: str = "",
        truncation: str = "",
        timeout: float | None = None,
    ) -> list[ScoreResult]:
        """Score chat conversations rendered with the reward model's chat template."""
        return self._score(message_items(conversations), model, truncation, timeout)

    def _score(
        self, items: list[pb.ScoreItem], model: str, truncation: str, timeout: float | None
    ) -> list[ScoreResult]:
        if not items:
            return []
        reqs = score_requests(items, model, truncation, self._max_items())
        return [r for resp in self._chunked("Score", reqs, timeout) for r in parse_scores(resp)]

    def reference_logprobs(
        self,
        token_ids: Sequence[Sequence[int]],
        response_starts: Sequence[int],
        temperature: float = 1.0,
        *,
        model: str = "",
        tokenizer_fingerprint: str | None = None,
        timeout: float | None = None,
    ) -> list[np.ndarray]:
        """Per-token reference log-probs of positions response_start..len-1 (float32 arrays)."""
        if not token_ids:
            return []
        reqs = ref_requests(
            token_ids,
            response_starts,
            temperature,
            model,
            tokenizer_fingerprint,
            self._max_items(),
        )
        return parse_logprobs(self._chunked("ReferenceLogProbs", reqs, timeout))

    def server_info(self, timeout: float | None = None) -> pb.GetServerInfoResponse:
        """Models, roles, limits, fingerprints."""
        return self._call(
            "GetServerInfo",
            pb.GetServerInfoRequest(),
            time.monotonic() + (timeout or self._policy.timeout),
        )

    def health(self, service: str = "", timeout: float = 5.0) -> str:
        """Health status name of the first address (SERVING, NOT_SERVING, or the error code name)."""
        return self._health_of(0, service, timeout)

    def _health_of(self, idx: int, service: str, timeout: float) -> str:
        try:
            resp = self._health[idx].Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=timeout,
                metadata=self._policy.metadata,
            )
        except grpc.RpcError as err:
            return err.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def wait_until_ready(self, timeout: float = 60.0, service: str = "") -> None:
        """Poll every address's health service until all say SERVING; RewardServiceError on timeout."""
        end = time.monotonic() + timeout
        pending = set(range(len(self._health)))
        last = ""
        while pending:
            for idx in sorted(pending):
                last = self._health_of(idx, service, min(2.0, max(0.1, end - time.monotonic())))
                if last == "SERVING":
                    pending.discard(idx)
            if not pending:
                return
            if time.monotonic() >= end:
                raise RewardServiceError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"not SERVING after {timeout:.0f}s (last status {last})",
                    "Health",
                )
            time.sleep(0.1)


# ---------------------------------------------------------------------------- asyncio client
class AsyncRewardClient(_ClientBase):
    """asyncio client with the same methods as `RewardClient` (all `async`)."""

    _channel_module = grpc.aio

    async def __aenter__(self) -> AsyncRewardClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every channel."""
        for c in self._channels:
            await c.close()

    async def _call(self, method: str, request: Any, deadline: float) -> Any:
        pol = self._policy
        idx = pol.next_index()
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RewardServiceError(
                    grpc.StatusCode.DEADLINE_EXCEEDED, "client deadline passed", method
                )
            try:
                return await getattr(self._stubs[idx], method)(
                    request, timeout=remaining, metadata=pol.metadata
                )
            except grpc.RpcError as err:
                delay, idx = pol.on_error(method, err, attempt, idx, deadline)
                attempt += 1
                await asyncio.sleep(delay)

    async def _chunked(self, method: str, requests: list[Any], timeout: float | None) -> list[Any]:
        deadline = time.monotonic() + (timeout or self._policy.timeout)
        return list(await asyncio.gather(*(self._call(method, r, deadline) for r in requests)))

    async def _max_items(self) -> int:
        if self._policy.max_items is None:
            try:
                self._policy.max_items = (
                    int((await self.server_info()).max_items_per_request) or DEFAULT_CHUNK
                )
            except RewardServiceError:
                return DEFAULT_CHUNK
        return self._policy.max_items

    async def score(
        self,
        pairs: Sequence[PairLike],
        *,
        model: str = "",
        truncation: str = "",
        timeout: float | None = None,
    ) -> list[ScoreResult]:
        """Score (prompt, completion) pairs (or dicts); results in input order."""
        return await self._score(score_items(pairs), model, truncation, timeout)

    async def score_messages(
        self,
        conversations: Sequence[Sequence[dict[str, str]]],
        *,
        model: str = "",
        truncation: str = "",
        timeout: float | None = None,
    ) -> list[ScoreResult]:
        """Score chat conversations rendered with the reward model's chat template."""
        return await self._score(message_items(conversations), model, truncation, timeout)

    async def _score(
        self, items: list[pb.ScoreItem], model: str, truncation: str, timeout: float | None
    ) -> list[ScoreResult]:
        if not items:
            return []
        reqs = score_requests(items, model, truncation, await self._max_items())
        return [
            r for resp in await self._chunked("Score", reqs, timeout) for r in parse_scores(resp)
        ]

    async def reference_logprobs(
        self,
        token_ids: Sequence[Sequence[int]],
        response_starts: Sequence[int],
        temperature: float = 1.0,
        *,
        model: str = "",
        tokenizer_fingerprint: str | None = None,
        timeout: float | None = None,
    ) -> list[np.ndarray]:
        """Per-token reference log-probs of positions response_start..len-1 (float32 arrays)."""
        if not token_ids:
            return []
        reqs = ref_requests(
            token_ids,
            response_starts,
            temperature,
            model,
            tokenizer_fingerprint,
            await self._max_items(),
        )
        return parse_logprobs(await self._chunked("ReferenceLogProbs", reqs, timeout))

    async def server_info(self, timeout: float | None = None) -> pb.GetServerInfoResponse:
        """Models, roles, limits, fingerprints."""
        return await self._call(
            "GetServerInfo",
            pb.GetServerInfoRequest(),
            time.monotonic() + (timeout or self._policy.timeout),
        )

    async def health(self, service: str = "", timeout: float = 5.0) -> str:
        """Health status name of the first address."""
        try:
            resp = await self._health[0].Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=timeout,
                metadata=self._policy.metadata,
            )
        except grpc.RpcError as err:
            return err.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    async def wait_until_ready(self, timeout: float = 60.0, service: str = "") -> None:
        """Poll the health service until SERVING; RewardServiceError on timeout."""
        end = time.monotonic() + timeout
        last = ""
        while time.monotonic() < end:
            last = await self.health(service, timeout=min(2.0, max(0.1, end - time.monotonic())))
            if last == "SERVING":
                return
            await asyncio.sleep(0.1)
        raise RewardServiceError(
            grpc.StatusCode.UNAVAILABLE,
            f"not SERVING after {timeout:.0f}s (last status {last})",
            "Health",
        )
