"""The client API, written once as steps that the blocking and asyncio faces execute.

Each public method is a generator (sans-IO): it yields operations (`Unary`: send these requests
concurrently, once each; `Check`: ask address i's health service; `Sleep`) and receives their
outcomes. `blocking.RewardClient` runs them with grpc, `aio.AsyncRewardClient` with grpc.aio;
`face_methods` derives both faces' public methods from the same generators, so the two cannot
differ in logic, names, signatures or docstrings.
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
import typing
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from reward_server.api.rlhf.v1 import reward_service_pb2 as pb
from reward_server.api.rlhf.v1 import reward_service_pb2_grpc as pb_grpc
from reward_server.client.channels import (
    METHODS,
    bearer_metadata,
    channel_options,
    credentials,
    split_targets,
)
from reward_server.client.messages import (
    Conversation,
    PairLike,
    ScoreResult,
    id_items,
    message_items,
    parse_logprobs,
    parse_scores,
    ref_requests,
    score_items,
    score_requests,
)
from reward_server.client.retry import Failure, RetryPolicy, RewardServiceError

T = TypeVar("T")
DEFAULT_CHUNK = 256
"""Items per request when the server's limit is unknown (it did not answer GetServerInfo)."""
CLOSED = Failure(grpc.StatusCode.CANCELLED, "the client was closed")


@dataclass(slots=True)
class Unary:
    """Send `requests[k]` to channel `targets[k]`, concurrently; the outcome of each is its
    response or a `Failure`."""

    method: str
    requests: list[Any]
    targets: list[int]
    timeout: float


@dataclass(slots=True)
class Check:
    """Health.Check of channel `index`; the outcome is the status name (SERVING, NOT_SERVING)
    or the error code's name (UNAVAILABLE, UNAUTHENTICATED, ...)."""

    index: int
    service: str
    timeout: float


@dataclass(slots=True)
class Sleep:
    """Wait (cut short when the client is closed)."""

    seconds: float


Op = Unary | Check | Sleep


def failure(err: grpc.RpcError) -> Failure:
    """The status of a failed gRPC call."""
    return Failure(err.code(), err.details() or "")


def health_request(service: str) -> health_pb2.HealthCheckRequest:
    """A Health.Check request for `service` ("" = the whole server)."""
    return health_pb2.HealthCheckRequest(service=service)


def status_name(resp: health_pb2.HealthCheckResponse) -> str:
    """SERVING, NOT_SERVING, ... of a Health.Check response."""
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


Steps = Generator[Op, Any, T]


class ClientBase:
    """Addresses, retry policy, channels and stubs; the faces differ only in the grpc module
    (`_grpc`: grpc or grpc.aio) and in how they execute the steps."""

    _grpc: Any = grpc

    def __init__(
        self,
        address: str,
        *,
        timeout: float = 30.0,
        max_retries: int = 5,
        backoff_base: float = 0.05,
        backoff_max: float = 2.0,
        budget_seconds: float | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        token: str | None = None,
        max_message_mb: int = 64,
        tenant: str | None = None,
        score_stream: bool = False,
    ) -> None:
        """Connect to ``address``: ``host:port``, ``"h1:p,h2:p"`` (failover between them) or a
        gRPC name such as ``dns:///svc:50051`` (round_robin over what it resolves to). The
        retry parameters are those of `RetryPolicy`; TLS when ``tls_ca`` or ``tls_cert`` is given;
        ``token`` (default: env ``RLHF_AUTH_TOKEN``) is sent as a bearer token on every call;
        ``tenant`` as the ``tenant`` metadata key, which names the caller's tenant on a server
        without auth (with auth the token's name is the tenant and the key is ignored).
        ``score_stream`` (asyncio client only) sends Score requests over one long-lived
        ScoreStream per server instead of one call each (`reward_server.client.stream_mux`:
        less CPU per request on both sides, for many small concurrent requests)."""
        if score_stream and self._grpc is grpc:
            raise ValueError("score_stream needs the asyncio client (AsyncRewardClient)")
        self._score_stream = score_stream
        self._muxes: dict[int, Any] = {}
        self._targets = split_targets(address)
        self.retry_policy = RetryPolicy(
            len(self._targets), timeout, max_retries, backoff_base, backoff_max, budget_seconds
        )
        self._metadata = bearer_metadata(token) + ((("tenant", tenant),) if tenant else ())
        creds = credentials(tls_ca, tls_cert, tls_key)
        opts = channel_options(self.retry_policy, max_message_mb)
        mod = self._grpc
        self._channels = [
            mod.secure_channel(t, creds, opts) if creds else mod.insecure_channel(t, opts)
            for t in self._targets
        ]
        stubs = [pb_grpc.RewardServiceStub(c) for c in self._channels]
        self._rpcs = [{m: getattr(s, m) for m in METHODS} for s in stubs]
        self._health = [health_pb2_grpc.HealthStub(c).Check for c in self._channels]
        self._max_items: int | None = None
        self._closed = False
        self._closing = threading.Event()  # cuts the blocking face's sleeps short on close

    @property
    def targets(self) -> list[str]:
        """The addresses this client balances over."""
        return list(self._targets)


class Api:
    """The public methods, as steps; ``self`` is the client (a `ClientBase`)."""

    def score(
        self,
        pairs: Sequence[PairLike],
        *,
        model: str = "",
        truncation: str = "",
        timeout: float | None = None,
        model_version: str = "",
    ) -> Steps[list[ScoreResult]]:
        """Score (prompt, completion) pairs (or dicts); results in input order, each with the
        `model_version` that answered. `model_version` pins the version: another one is
        FAILED_PRECONDITION naming both."""
        items = score_items(pairs)
        return (yield from _score(self, items, model, truncation, timeout, "", model_version))

    def score_messages(
        self,
        conversations: Sequence[Conversation],
        *,
        model: str = "",
        truncation: str = "",
        timeout: float | None = None,
        model_version: str = "",
    ) -> Steps[list[ScoreResult]]:
        """Score chat conversations rendered with the reward model's chat template
        (`model_version`: an optional pin, as in `score`)."""
        items = message_items(conversations)
        return (yield from _score(self, items, model, truncation, timeout, "", model_version))

    def score_ids(
        self,
        token_ids: Sequence[Sequence[int]],
        *,
        tokenizer_fingerprint: str,
        model: str = "",
        truncation: str = "",
        timeout: float | None = None,
        model_version: str = "",
    ) -> Steps[list[ScoreResult]]:
        """Score token id sequences exactly as given (no decode, no re-tokenisation, no
        template; truncation still applies); `tokenizer_fingerprint` is that of the tokenizer
        that produced them (`reward_server.fingerprint`) and must be the reward model's
        (FAILED_PRECONDITION otherwise). Results in input order (`model_version`: an optional
        pin, as in `score`)."""
        if not tokenizer_fingerprint:
            raise ValueError("score_ids needs the tokenizer_fingerprint of the ids' tokenizer")
        items = id_items(token_ids)
        return (
            yield from _score(
                self, items, model, truncation, timeout, tokenizer_fingerprint, model_version
            )
        )

    def reference_logprobs(
        self,
        token_ids: Sequence[Sequence[int]],
        response_starts: Sequence[int],
        temperature: float = 1.0,
        *,
        model: str = "",
        tokenizer_fingerprint: str | None = None,
        timeout: float | None = None,
        model_version: str = "",
    ) -> Steps[list[np.ndarray]]:
        """Per-token reference log-probs of positions response_start..len-1 (float32 arrays).
        `model_version` pins the reference model's version (FAILED_PRECONDITION naming both
        when the server answers with another); `server_info()` lists the versions served."""
        if not token_ids:
            return []
        size = yield from _max_items(self)
        reqs = ref_requests(
            token_ids,
            response_starts,
            temperature,
            model,
            tokenizer_fingerprint,
            size,
            model_version,
        )
        return parse_logprobs((yield from _call(self, "ReferenceLogProbs", reqs, timeout)))

    def server_info(self, timeout: float | None = None) -> Steps[pb.GetServerInfoResponse]:
        """Models, roles, limits, fingerprints."""
        return (yield from _server_info(self, timeout, True))

    def stats(
        self, *, model: str = "", tenant: str = "", timeout: float | None = None
    ) -> Steps[pb.GetStatsResponse]:
        """The server's reward-hacking telemetry (GetStats): per reward model and tenant, the
        figures of its sliding window of scores; ``model`` / ``tenant`` filter them."""
        (resp,) = yield from _call(
            self, "GetStats", [pb.GetStatsRequest(model=model, tenant=tenant)], timeout
        )
        return resp

    def health(self, service: str = "", timeout: float = 5.0) -> Steps[str]:
        """SERVING when every address says SERVING; otherwise the first other answer: its
        status name (NOT_SERVING) or its error code's name (UNAVAILABLE, UNAUTHENTICATED)."""
        for idx in range(len(self._targets)):
            status = yield Check(idx, service, timeout)
            if status != "SERVING":
                return status
        return "SERVING"

    def wait_until_ready(self, timeout: float = 60.0, service: str = "") -> Steps[None]:
        """Poll every address's health service until all say SERVING; RewardServiceError
        (UNAVAILABLE) on timeout."""
        end = time.monotonic() + timeout
        pending = list(range(len(self._targets)))
        last = ""
        while True:
            for idx in list(pending):
                last = yield Check(idx, service, min(2.0, max(0.1, end - time.monotonic())))
                if last == "SERVING":
                    pending.remove(idx)
            if not pending:
                return None
            if time.monotonic() >= end or self._closed:
                raise RewardServiceError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"not SERVING after {timeout:.0f}s (last status {last})",
                    "Health",
                )
            yield Sleep(0.1)


API = (
    "score",
    "score_messages",
    "score_ids",
    "reference_logprobs",
    "server_info",
    "stats",
    "health",
    "wait_until_ready",
)
"""Every public method of both faces, each a generator of `Api`."""


def _score(
    client: Any,
    items: list[pb.ScoreItem],
    model: str,
    truncation: str,
    timeout: float | None,
    fingerprint: str = "",
    model_version: str = "",
) -> Steps[list[ScoreResult]]:
    if not items:
        return []
    size = yield from _max_items(client)
    reqs = score_requests(items, model, truncation, size, fingerprint, model_version)
    return parse_scores((yield from _call(client, "Score", reqs, timeout)))


def _server_info(client: Any, timeout: float | None, budget: bool) -> Steps[Any]:
    """GetServerInfo, remembering the server's max_items_per_request."""
    (info,) = yield from _call(
        client, "GetServerInfo", [pb.GetServerInfoRequest()], timeout, budget
    )
    client._max_items = int(info.max_items_per_request) or DEFAULT_CHUNK
    return info


def _max_items(client: Any) -> Steps[int]:
    """The server's max_items_per_request: asked once, without the retry budget (the request
    that follows has it); DEFAULT_CHUNK while the server does not answer."""
    if client._max_items is None:
        try:
            yield from _server_info(client, None, False)
        except RewardServiceError:
            return DEFAULT_CHUNK
    return client._max_items


def _call(
    client: Any,
    method: str,
    requests: list[Any],
    timeout: float | None,
    budget: bool = True,
) -> Steps[list[Any]]:
    """Send `requests` concurrently and retry the failed ones as the policy says; the responses
    in order, or RewardServiceError."""
    policy = client.retry_policy
    state = policy.start(method, client._targets, timeout=timeout, budget=budget)
    results: list[Any] = [None] * len(requests)
    pending = list(range(len(requests)))
    targets = [policy.pick() for _ in pending]
    while True:
        left = state.remaining()
        if client._closed:
            outcomes: list[Any] = [CLOSED] * len(pending)
        elif left <= 0:
            outcomes = [Failure(grpc.StatusCode.DEADLINE_EXCEEDED, "client deadline passed")]
            outcomes *= len(pending)
        else:
            outcomes = yield Unary(method, [requests[i] for i in pending], targets, left)
        failed = []
        for i, target, out in zip(pending, targets, outcomes, strict=True):
            if isinstance(out, Failure):
                failed.append((i, target, out))
            else:
                results[i] = out
        answered = {  # replicas that answered (a final error is an answer too)
            t
            for t, out in zip(targets, outcomes, strict=True)
            if not isinstance(out, Failure) or out.code not in policy.retryable
        }
        for target in answered:
            policy.replicas.success(state.names[target])
        if not failed:
            return results
        step = state.after_failure([(t, f) for _, t, f in failed])
        pending = [i for i, _, _ in failed]
        targets = [step.target] * len(pending)
        if step.delay > 0:
            yield Sleep(step.delay)
        if step.wait_serving_until is not None:
            while not client._closed and time.monotonic() < step.wait_serving_until:
                left = step.wait_serving_until - time.monotonic()
                if (yield Check(0, "", min(2.0, max(0.1, left)))) == "SERVING":
                    break
                yield Sleep(0.2)


def _returns(steps: Callable[..., Any]) -> Any:
    """T of a ``-> Steps[T]`` annotation."""
    hint = typing.get_type_hints(steps, globals())["return"]
    return typing.get_args(hint)[2]


def face_methods(blocking: bool) -> dict[str, Callable[..., Any]]:
    """The public methods of a face, one per `API` name: each creates the steps of the `Api`
    method and hands them to ``self._run`` (a plain method when `blocking`, else a coroutine).
    Signatures and docstrings are the `Api` method's, with its return type."""
    out = {}
    for name in API:
        steps = getattr(Api, name)
        method = _blocking_method(steps) if blocking else _async_method(steps)
        functools.update_wrapper(method, steps)
        returns = _returns(steps)
        method.__annotations__ = {**steps.__annotations__, "return": returns}
        method.__signature__ = inspect.signature(steps).replace(return_annotation=returns)  # type: ignore[attr-defined]
        out[name] = method
    return out


def _blocking_method(steps: Callable[..., Steps[Any]]) -> Callable[..., Any]:
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        return self._run(steps(self, *args, **kwargs))

    return method


def _async_method(steps: Callable[..., Steps[Any]]) -> Callable[..., Any]:
    async def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        return await self._run(steps(self, *args, **kwargs))

    return method
