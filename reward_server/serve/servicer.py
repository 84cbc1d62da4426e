"""The gRPC servicer: proto in, engine call, proto out; errors mapped to status codes.

`RewardServicer.run` is the one request path of both doors: the gRPC RPCs and the HTTP door
(`serve/http.py`, through `score` and `reference_logprobs`) take it."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc

from reward_server.api.rlhf.v1 import reward_service_pb2 as pb
from reward_server.api.rlhf.v1 import reward_service_pb2_grpc as pb_grpc
from reward_server.engine.engine import Engine
from reward_server.errors import InvalidArgument, PermissionDenied, ServiceError, Unavailable
from reward_server.score_result import ScoreResult
from reward_server.serve import convert
from reward_server.serve.metrics import ServerMetrics
from reward_server.serve.status import grpc_code
from reward_server.serve.telemetry import Telemetry
from reward_server.serve.tenants import DEFAULT_TENANT, TenantResolver

log = logging.getLogger(__name__)
T = TypeVar("T")
STREAM_WINDOW = 32  # requests of one ScoreStream processed concurrently


class Malformed:
    """A request whose bytes did not parse as its message (random bytes, a string field holding
    invalid UTF-8): the servicer answers it with INVALID_ARGUMENT instead of gRPC's UNKNOWN."""

    def __init__(self, message: str, error: Exception) -> None:
        self.error = InvalidArgument(
            f"the request could not be parsed as {message}: {error or type(error).__name__}"
        )
        self.request_id = ""


def tolerant(cls: type) -> Callable[[bytes], object]:
    """A request deserializer that returns `Malformed` instead of raising."""
    name = cls.DESCRIPTOR.full_name

    def parse(data: bytes) -> object:
        try:
            return cls.FromString(data)
        except Exception as exc:  # DecodeError, and whatever else the parser may raise
            return Malformed(name, exc)

    return parse


def add_to_server(
    servicer: object, server: grpc.aio.Server, service_name: str = "RewardService"
) -> None:
    """`add_RewardServiceServicer_to_server` (or another service's, by `service_name`) with
    tolerant request deserializers, every RPC of the service descriptor (a new RPC needs no
    change here)."""
    desc = pb.DESCRIPTOR.services_by_name[service_name]
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    handlers = {
        m.name: kinds[(m.client_streaming, m.server_streaming)](
            getattr(servicer, m.name),
            request_deserializer=tolerant(getattr(pb, m.input_type.name)),
            response_serializer=getattr(pb, m.output_type.name).SerializeToString,
        )
        for m in desc.methods
    }
    service = desc.full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


def _items(request: object, field: str) -> int:
    return 0 if isinstance(request, Malformed) else len(getattr(request, field))


Tenant = str | ServiceError
"""A call's tenant, or the error that naming it raised (answered inside `run`)."""


def _tenant_name(tenant: Tenant) -> str:
    return tenant if isinstance(tenant, str) else DEFAULT_TENANT


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class RewardServicer(pb_grpc.RewardServiceServicer):
    """Implements rlhf.v1.RewardService over an `Engine`."""

    def __init__(
        self, engine: Engine, metrics: ServerMetrics, tenants: TenantResolver | None = None
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.tenants = tenants or TenantResolver(())
        self.draining = False
        self.ready = False  # set by the server once models are loaded and warmed up
        self.inflight = 0
        cfg = engine.config
        self.telemetry: Telemetry | None = None
        if cfg.telemetry:
            self.telemetry = Telemetry(
                cfg.telemetry_window_items,
                cfg.telemetry_window_seconds,
                cfg.telemetry_max_tenants,
            )
            metrics.add_telemetry(self.telemetry)

    async def run(
        self,
        rpc: str,
        request_id: str,
        n_items: int,
        work: Callable[[str], Awaitable[T]],
        tenant: str = DEFAULT_TENANT,
    ) -> T:
        """Run one request's `work` as every door does (gRPC and HTTP): refuse it while starting
        or draining, count it in the metrics under `rpc` and `tenant`, log its failure. Raises the
        `ServiceError` the work raised; any other exception becomes a `ServiceError` (INTERNAL)
        naming the request id. Each door maps the error onto its own status code."""
        rid = request_id or uuid.uuid4().hex[:12]
        t0 = time.monotonic()
        code = "OK"
        self.inflight += 1
        self.metrics.inflight.inc()
        self.metrics.items.labels(rpc).inc(n_items)
        self.metrics.tenant_items.labels(tenant).inc(n_items)
        try:
            if self.draining:
                raise Unavailable("server is draining for shutdown; retry on another replica")
            if not self.ready:
                raise Unavailable("server is starting: models are still loading; retry shortly")
            return await work(rid)
        except ServiceError as exc:
            code = exc.code
            log.info("%s request %s -> %s: %s", rpc, rid, code, exc.message)
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as exc:
            code = "INTERNAL"
            log.exception("%s request %s failed", rpc, rid)
            raise ServiceError(f"internal error; request id {rid} (see server log)") from exc
        finally:
            self.inflight -= 1
            self.metrics.inflight.dec()
            self.metrics.requests.labels(rpc, code).inc()
            self.metrics.tenant_requests.labels(tenant, code).inc()
            self.metrics.request_time.labels(rpc).observe(time.monotonic() - t0)

    async def _call(
        self,
        rpc: str,
        context: grpc.aio.ServicerContext,
        request_id: str,
        n_items: int,
        work: Callable[[str], Awaitable[T]],
        tenant: str = DEFAULT_TENANT,
    ) -> T:
        """`run` with its errors turned into the call's gRPC status."""
        try:
            return await self.run(rpc, request_id, n_items, work, tenant)
        except ServiceError as exc:
            await context.abort(grpc_code(exc), exc.message)
        raise AssertionError("unreachable")  # abort() always raises

    def tenant_of(self, context: grpc.aio.ServicerContext) -> Tenant:
        """The call's tenant (`TenantResolver.of_metadata`), or the error naming it raised."""
        try:
            return self.tenants.of_metadata(context.invocation_metadata())
        except ServiceError as exc:
            return exc

    async def _score(
        self,
        request: pb.ScoreRequest,
        deadline: float | None,
        rid: str,
        tenant: Tenant = DEFAULT_TENANT,
    ) -> pb.ScoreResponse:
        if isinstance(request, Malformed):
            raise request.error
        if not isinstance(tenant, str):
            raise tenant
        model, results, timing, version = await self.engine.score(
            request.model,
            convert.score_inputs(request),
            convert.truncation(request),
            deadline,
            request.tokenizer_fingerprint,
            request.model_version,
            tenant,
        )
        self.metrics.tokenize_time.labels(model).observe(timing.tokenize)
        self._observe(model, tenant, results)
        return convert.score_response(model, results, timing, rid, version)

    def _observe(self, model: str, tenant: str, results: list[ScoreResult]) -> None:
        """The telemetry of an answered Score request (`serve.telemetry`: O(1) per item). A
        failure here is logged, never the request's: its scores are already computed."""
        if self.telemetry is None:
            return
        comb = self.engine.registry.combinations.get(model)
        try:
            self.telemetry.observe(model, tenant, results, comb.members if comb else ())
        except Exception:  # noqa: BLE001 - telemetry must not fail a Score
            log.exception("telemetry of a %s request failed", model)

    async def _logprobs(
        self,
        request: pb.ReferenceLogProbsRequest,
        deadline: float | None,
        rid: str,
        tenant: Tenant = DEFAULT_TENANT,
    ) -> pb.ReferenceLogProbsResponse:
        if isinstance(request, Malformed):
            raise request.error
        if not isinstance(tenant, str):
            raise tenant
        model, arrays, timing, version = await self.engine.reference_logprobs(
            request.model,
            convert.ref_sequences(request),
            request.temperature,
            request.tokenizer_fingerprint,
            deadline,
            request.model_version,
            tenant,
        )
        return convert.logprobs_response(model, arrays, timing, rid, version)

    async def score(
        self,
        request: pb.ScoreRequest,
        deadline: float | None,
        rpc: str = "Score",
        tenant: Tenant = DEFAULT_TENANT,
    ) -> pb.ScoreResponse:
        """Score a request (the path of the gRPC `Score` RPC; the HTTP door calls it with its
        route as `rpc`). Raises `ServiceError`."""
        return await self.run(
            rpc,
            request.request_id,
            len(request.items),
            lambda rid: self._score(request, deadline, rid, tenant),
            _tenant_name(tenant),
        )

    async def reference_logprobs(
        self,
        request: pb.ReferenceLogProbsRequest,
        deadline: float | None,
        rpc: str = "ReferenceLogProbs",
        tenant: Tenant = DEFAULT_TENANT,
    ) -> pb.ReferenceLogProbsResponse:
        """Reference log-probs of a request (the path of the gRPC `ReferenceLogProbs` RPC).
        Raises `ServiceError`."""
        return await self.run(
            rpc,
            request.request_id,
            len(request.sequences),
            lambda rid: self._logprobs(request, deadline, rid, tenant),
            _tenant_name(tenant),
        )

    async def Score(
        self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> pb.ScoreResponse:
        deadline = _deadline(context)
        tenant = self.tenant_of(context)
        return await self._call(
            "Score",
            context,
            request.request_id,
            _items(request, "items"),
            lambda rid: self._score(request, deadline, rid, tenant),
            _tenant_name(tenant),
        )

    async def ScoreStream(
        self, request_iterator: AsyncIterator[pb.ScoreRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ScoreResponse]:
        """One response per request, in request order, up to STREAM_WINDOW at once. A request
        that fails (bad input, malformed bytes, a full queue...) is answered in the stream with
        its own `status` and the stream goes on (as Triton's ModelStreamInfer carries
        `error_message`); cancelling the stream drops its queued items."""
        deadline = _deadline(context)
        tenant = self.tenant_of(context)
        pending: asyncio.Queue = asyncio.Queue(STREAM_WINDOW)

        async def one(req: pb.ScoreRequest | Malformed) -> pb.ScoreResponse:
            try:
                return await self.run(
                    "ScoreStream",
                    req.request_id,
                    _items(req, "items"),
                    lambda rid: self._score(req, deadline, rid, tenant),
                    _tenant_name(tenant),
                )
            except ServiceError as exc:
                code = grpc_code(exc)
                return pb.ScoreResponse(
                    request_id=req.request_id,
                    status=pb.RequestStatus(
                        code=code.value[0], name=code.name, message=exc.message
                    ),
                )

        async def reader() -> None:
            async for req in request_iterator:
                await pending.put(asyncio.ensure_future(one(req)))
            await pending.put(None)

        reader_task = asyncio.ensure_future(reader())
        try:
            while True:
                task = await pending.get()
                if task is None:
                    break
                yield await task  # responses in request order
        finally:
            reader_task.cancel()
            while not pending.empty():
                t = pending.get_nowait()
                if t is not None:
                    t.cancel()

    async def ReferenceLogProbs(
        self, request: pb.ReferenceLogProbsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReferenceLogProbsResponse:
        deadline = _deadline(context)
        tenant = self.tenant_of(context)
        return await self._call(
            "ReferenceLogProbs",
            context,
            request.request_id,
            _items(request, "sequences"),
            lambda rid: self._logprobs(request, deadline, rid, tenant),
            _tenant_name(tenant),
        )

    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetServerInfoResponse:
        async def work(rid: str) -> pb.GetServerInfoResponse:
            if isinstance(request, Malformed):
                raise request.error
            cfg = self.engine.config
            return pb.GetServerInfoResponse(
                version=self.engine.version,
                models=[convert.model_info(d) for d in self.engine.registry.describe()],
                max_items_per_request=cfg.max_items_per_request,
                max_batch_tokens=self.engine.max_batch_tokens,
                max_batch_items=cfg.max_batch_items,
                max_message_bytes=cfg.max_message_mb << 20,
                default_reward_model=cfg.default_reward_model,
                default_reference_model=cfg.default_reference_model,
                default_truncation=convert.TRUNCATION_TO_PB[cfg.truncation],
                batch_invariant=cfg.batch_invariant,
            )

        tenant = _tenant_name(self.tenant_of(context))
        return await self._call("GetServerInfo", context, "", 0, work, tenant)

    async def GetStats(
        self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetStatsResponse:
        """The reward-hacking telemetry windows (`serve.telemetry`)."""

        tenant = self.tenant_of(context)

        async def work(rid: str) -> pb.GetStatsResponse:
            if isinstance(request, Malformed):
                raise request.error
            if not isinstance(tenant, str):
                raise tenant
            cfg = self.engine.config
            only = self._stats_scope(tenant, request.tenant)
            windows = []
            if self.telemetry is not None:
                windows = self.telemetry.stats(request.model, only)
                if only:  # the telemetry keys tenants past its cap as `_other`
                    windows = [w for w in windows if w.tenant == only]
            return convert.stats_response(
                windows,
                enabled=self.telemetry is not None,
                max_items=cfg.telemetry_window_items,
                max_seconds=cfg.telemetry_window_seconds,
                max_tenants=cfg.telemetry_max_tenants,
            )

        return await self._call("GetStats", context, "", 0, work, _tenant_name(tenant))

    def _stats_scope(self, caller: str, asked: str) -> str:
        """The tenant whose windows a GetStats caller may see ("" = every tenant): with auth on,
        its own unless it is one of `stats_viewers`; PermissionDenied asking for another's."""
        if not self.tenants.auth or caller in self.engine.config.stats_viewers:
            return asked
        if asked and asked != caller:
            raise PermissionDenied(
                f"tenant {caller!r} may read its own telemetry only, not {asked!r} "
                "(the server's --stats-viewers lists the tenants that see every tenant)"
            )
        return caller


class AdminServicer:
    """Implements rlhf.v1.AdminService (registered only when the server has admin tokens).

    Every call needs ``authorization: Bearer <admin token>``; the scoring tokens' interceptor
    lets this service's calls through to here (`ADMIN_METHODS`), and a scoring token (or any
    other) is PERMISSION_DENIED, a missing one UNAUTHENTICATED."""

    def __init__(self, engine: Engine, reward: RewardServicer, admin_tokens: list[str]) -> None:
        self.engine = engine
        self.reward = reward
        self._tokens = [t.encode() for t in admin_tokens]

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        from reward_server.serve.auth import token_matches

        auth = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                auth = value if isinstance(value, str) else value.decode()
        if not auth:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "AdminService needs metadata 'authorization: Bearer <admin token>'",
            )
        token = auth[len("Bearer ") :] if auth.startswith("Bearer ") else ""
        if not token_matches(token, self._tokens):
            log.warning("refused an AdminService call: not an admin token")
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "not an admin token (scoring tokens are never accepted by AdminService)",
            )

    async def ReloadModel(
        self, request: pb.ReloadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReloadModelResponse:
        await self._authorize(context)

        async def work(rid: str) -> pb.ReloadModelResponse:
            if isinstance(request, Malformed):
                raise request.error
            if not request.model:
                raise InvalidArgument("ReloadModel needs `model`: the served model to reload")
            r = await self.engine.reload(request.model, request.source)
            return pb.ReloadModelResponse(
                model=r.model,
                old_version=r.old_version,
                new_version=r.new_version,
                status=r.status,
                source=r.source,
                load_seconds=r.load_seconds,
                transition_seconds=r.transition_seconds,
            )

        return await self.reward._call(
            "ReloadModel", context, getattr(request, "request_id", ""), 0, work
        )
