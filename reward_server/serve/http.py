"""The HTTP/JSON door (`serve --http-port`): OpenRLHF's remote reward-model protocol, the
protobuf messages' JSON mapping, and a health probe, on the gRPC server's event loop.

Every scoring route goes through `RewardServicer.score` / `.reference_logprobs`, the path of the
gRPC RPCs, so the engine, the batchers, the validation, the error messages, the metrics (with the
route as the `rpc` label) and the drain are the gRPC door's. Bearer tokens are the same ones
(`Authorization: Bearer <token>`), checked with `auth.token_matches`; errors map onto HTTP
statuses through `status.http_status`. Routes, payloads and the status table: docs/API.md,
"HTTP/JSON front door".

aiohttp, because it is asyncio-native and maintained, and its `AppRunner`/`TCPSite` start a server
on an already running loop (the one grpc.aio serves on) without threads or a loop of its own.
"""

from __future__ import annotations

import json
import logging
import math
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from google.protobuf import json_format

from reward_server.api.rlhf.v1 import reward_service_pb2 as pb
from reward_server.config import ServerConfig
from reward_server.errors import InvalidArgument, ServiceError
from reward_server.serve.auth import token_matches
from reward_server.serve.metrics import ServerMetrics
from reward_server.serve.servicer import RewardServicer
from reward_server.serve.status import http_status

log = logging.getLogger(__name__)

TIMEOUT_HEADER = "X-Request-Timeout"
"""Optional header: the request's deadline in seconds (like a gRPC deadline)."""
TENANT_HEADER = "X-Tenant"
"""Optional header naming the tenant when auth is off (gRPC: the ``tenant`` metadata key)."""
_TRUNCATION = {"": pb.TRUNCATION_UNSPECIFIED, "error": pb.TRUNCATION_ERROR}
_TRUNCATION |= {"left": pb.TRUNCATION_LEFT, "right": pb.TRUNCATION_RIGHT}


class HttpError(Exception):
    """An error answered before the request reaches the servicer (auth, body, route)."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.code, self.message = code, message
        self.status = status or http_status(code)


def error_response(code: str, message: str, status: int | None = None) -> web.Response:
    """``{"error": {"code": CODE, "message": MESSAGE}}`` with the code's HTTP status."""
    resp = _json({"error": {"code": code, "message": message}}, status or http_status(code))
    if code == "UNAUTHENTICATED":
        resp.headers["WWW-Authenticate"] = "Bearer"  # RFC 6750, section 3
    return resp


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(obj, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
    )


def split_query(query: str, prompt: str | None) -> tuple[str, str]:
    """One OpenRLHF query (prompt + response text) as (prompt, completion).

    With its prompt given and the query starting with it, the rest is the completion; otherwise
    (no prompt, a prompt the query does not start with, e.g. after the tokenizer's decode changed
    it, or nothing after it) the whole query is the completion of an empty prompt. A pair is
    scored as the text ``prompt + completion`` (`models/text_format.py`), so either way the model
    sees exactly the query.
    """
    if prompt and len(query) > len(prompt) and query.startswith(prompt):
        return prompt, query[len(prompt) :]
    return "", query


def _string_list(body: dict, key: str, n: int | None = None) -> list[str] | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"{key!r} must be a list of strings")
    if n is not None and len(value) != n:
        raise InvalidArgument(f"{key!r} has {len(value)} entries, 'query' has {n}")
    return value


def openrlhf_request(body: Any, model: str = "", truncation: str = "") -> pb.ScoreRequest:
    """OpenRLHF's `/get_reward` body (``{"query": [...], "prompts": [...], "labels": [...]}``)
    as a ScoreRequest; `labels` and any other key are accepted and ignored (a reward model does
    not read them)."""
    if not isinstance(body, dict):
        raise InvalidArgument('the body must be a JSON object {"query": [...], ...}')
    queries = _string_list(body, "query")
    if queries is None:
        raise InvalidArgument("'query' is missing: send the prompt+response texts to score")
    prompts = _string_list(body, "prompts", len(queries))
    if truncation not in _TRUNCATION:
        raise InvalidArgument(f"truncation must be left, right or error, got {truncation!r}")
    items = []
    for i, q in enumerate(queries):
        p, c = split_query(q, prompts[i] if prompts else None)
        items.append(pb.ScoreItem(prompt=p, completion=c))
    return pb.ScoreRequest(model=model, items=items, truncation=_TRUNCATION[truncation])


def openrlhf_response(resp: pb.ScoreResponse) -> dict[str, Any]:
    """A ScoreResponse as OpenRLHF reads it: `rewards` (advantages), `scores` (dynamic
    filtering), and `extra_logs`, each value a list with one number per query (OpenRLHF
    concatenates and splits them per sample)."""
    rewards = [s.score for s in resp.scores]
    extra: dict[str, list[float]] = {
        "num_tokens": [float(s.num_tokens) for s in resp.scores],
        "truncated": [float(s.truncated) for s in resp.scores],
    }
    if resp.scores and len(resp.scores[0].head_scores) > 1:  # multi-head model or combination
        for head in sorted(resp.scores[0].head_scores):
            extra[f"head/{head}"] = [s.head_scores[head] for s in resp.scores]
    if resp.scores and all(s.has_normalized_score for s in resp.scores):
        extra["normalized_score"] = [s.normalized_score for s in resp.scores]
    return {"rewards": rewards, "scores": rewards, "extra_logs": extra}


def _deadline(request: web.Request) -> float | None:
    """The monotonic deadline of the optional X-Request-Timeout header (seconds)."""
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise HttpError(
            "INVALID_ARGUMENT", f"{TIMEOUT_HEADER} must be a positive number of seconds"
        )
    return time.monotonic() + seconds


def _parse(body: Any, message: Any) -> Any:
    """`body` (parsed JSON) into `message` by the proto3 JSON mapping."""
    try:
        return json_format.ParseDict(body, message)
    except (json_format.ParseError, TypeError, AttributeError) as exc:
        raise HttpError(
            "INVALID_ARGUMENT", f"body is not a {message.DESCRIPTOR.full_name}: {exc}"
        ) from None


Handler = Callable[[web.Request, Any], Awaitable[dict]]


class HttpDoor:
    """The aiohttp application and its site, bound next to the gRPC server."""

    def __init__(self, cfg: ServerConfig, servicer: RewardServicer, metrics: ServerMetrics) -> None:
        self.cfg, self.servicer, self.metrics = cfg, servicer, metrics
        self._tokens = [t.encode() for t in cfg.auth_tokens()]
        self.app = web.Application(
            client_max_size=cfg.max_message_mb << 20, middlewares=[self._errors_as_json]
        )
        self.app.router.add_post("/get_reward", self._route("/get_reward", self._get_reward))
        self.app.router.add_post("/v1/score", self._route("/v1/score", self._score))
        self.app.router.add_post(
            "/v1/reference_logprobs",
            self._route("/v1/reference_logprobs", self._reference_logprobs),
        )
        self.app.router.add_get("/health", self._health)
        self._runner: web.AppRunner | None = None
        self.port = 0

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Listen on cfg.host:cfg.http_port (TLS with the gRPC door's certificates)."""
        cfg = self.cfg
        # access_log=None: no per-request log line (the gRPC door writes none either);
        # handler_cancellation: a client that disconnects cancels its request, as in gRPC, so
        # its items are dropped before the forward
        self._runner = web.AppRunner(
            self.app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, cfg.host, cfg.http_port, ssl_context=self._ssl())
        await site.start()
        self.port = cfg.http_port
        log.info(
            "HTTP/JSON door on %s://%s:%d (/get_reward, /v1/score, /v1/reference_logprobs, "
            "/health)",
            "https" if cfg.tls_cert else "http",
            cfg.host,
            self.port,
        )

    async def stop(self) -> None:
        """Close the listener and the open connections."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _ssl(self) -> ssl.SSLContext | None:
        cfg = self.cfg
        if not cfg.tls_cert:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
        if cfg.tls_client_ca:  # mutual TLS, as on the gRPC port
            ctx.load_verify_locations(cfg.tls_client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    # ------------------------------------------------------------------ plumbing
    @web.middleware
    async def _errors_as_json(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """aiohttp's own errors (no such route, wrong method, body too large) as JSON."""
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status == 404:
                return error_response("NOT_FOUND", f"no route {request.path}", 404)
            if exc.status == 405:
                return error_response(
                    "UNIMPLEMENTED", f"{request.method} is not allowed on {request.path}", 405
                )
            raise

    def _check_token(self, request: web.Request) -> None:
        if not self._tokens:
            return
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer ") and token_matches(auth[len("Bearer ") :], self._tokens):
            return
        reason = "missing bearer token" if not auth else "invalid bearer token"
        log.info("refused %s: %s", request.path, reason)
        raise HttpError("UNAUTHENTICATED", f"{reason}: send header 'Authorization: Bearer <token>'")

    async def _body(self, request: web.Request) -> Any:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            limit = self.cfg.max_message_mb
            raise HttpError(
                "RESOURCE_EXHAUSTED",
                f"request body over the limit of {limit} MiB (--max-message-mb)",
                413,
            ) from None
        try:
            return json.loads(raw)
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            raise HttpError("INVALID_ARGUMENT", f"malformed JSON body: {exc}") from None

    def _route(
        self, route: str, handle: Handler
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        """A handler: token, body, then `handle` (which calls the servicer); every request is
        counted once in reward_server_requests_total{rpc=ROUTE} (the servicer counts those that
        reach it)."""

        async def handler(request: web.Request) -> web.Response:
            try:
                self._check_token(request)
                body = await self._body(request)
                return _json(await handle(request, body))
            except HttpError as exc:
                self.metrics.requests.labels(route, exc.code).inc()
                return error_response(exc.code, exc.message, exc.status)
            except ServiceError as exc:  # counted by the servicer when raised there
                return error_response(exc.code, exc.message)
            except Exception:  # a bug in this door: INTERNAL, logged, the server keeps serving
                log.exception("%s request failed", route)
                self.metrics.requests.labels(route, "INTERNAL").inc()
                return error_response("INTERNAL", "internal error (see server log)")

        return handler

    def _tenant(self, request: web.Request) -> str | ServiceError:
        """The request's tenant (the gRPC door's rule, `serve/tenants.py`), or the error that
        naming it raised (answered by the servicer, counted there)."""
        try:
            return self.servicer.tenants.of_headers(
                request.headers.get("Authorization", ""), request.headers.get(TENANT_HEADER, "")
            )
        except ServiceError as exc:
            return exc

    # ------------------------------------------------------------------ routes
    async def _get_reward(self, request: web.Request, body: Any) -> dict:
        # OpenRLHF's remote reward model: the trainer posts {"query", "prompts", "labels"} and
        # reads "rewards", "scores" and "extra_logs" (one value per query), retrying any failure
        # https://github.com/OpenRLHF/OpenRLHF/blob/main/openrlhf/utils/remote_rm_utils.py
        # https://github.com/OpenRLHF/OpenRLHF/blob/main/openrlhf/cli/serve_rm.py
        try:
            req = openrlhf_request(
                body, request.query.get("model", ""), request.query.get("truncation", "")
            )
        except InvalidArgument as exc:
            raise HttpError(exc.code, exc.message) from None
        req.model_version = request.query.get("model_version", "")  # optional pin
        resp = await self.servicer.score(
            req, _deadline(request), "/get_reward", self._tenant(request)
        )
        out = openrlhf_response(resp)
        out["model_version"] = resp.model_version
        return out

    async def _score(self, request: web.Request, body: Any) -> dict:
        req = _parse(body, pb.ScoreRequest())
        resp = await self.servicer.score(
            req, _deadline(request), "/v1/score", self._tenant(request)
        )
        return _to_dict(resp)

    async def _reference_logprobs(self, request: web.Request, body: Any) -> dict:
        req = _parse(body, pb.ReferenceLogProbsRequest())
        resp = await self.servicer.reference_logprobs(
            req, _deadline(request), "/v1/reference_logprobs", self._tenant(request)
        )
        return _to_dict(resp)

    async def _health(self, request: web.Request) -> web.Response:
        """200 {"status": "SERVING"} only while serving; 503 NOT_SERVING while loading or
        draining. Needs the token unless --open-health, like grpc.health.v1."""
        if not self.cfg.open_health:
            try:
                self._check_token(request)
            except HttpError as exc:
                return error_response(exc.code, exc.message, exc.status)
        serving = self.servicer.ready and not self.servicer.draining
        return _json({"status": "SERVING" if serving else "NOT_SERVING"}, 200 if serving else 503)


def _to_dict(message: Any) -> dict:
    """A response message's canonical proto3 JSON mapping (lowerCamelCase names), with
    zero-valued fields included so every item has all its keys."""
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)
