"""Bearer-token authentication (a server interceptor) and TLS credentials."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)
HEALTH_METHODS = ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch")


def token_matches(presented: str, accepted: Iterable[bytes]) -> bool:
    """Constant-time comparison against every accepted token (no early exit)."""
    given = presented.encode()
    ok = False
    for tok in accepted:
        ok |= hmac.compare_digest(given, tok)
    return ok


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` on every call except `open_methods`.

    Missing or wrong credentials get UNAUTHENTICATED. Tokens are never logged.
    """

    def __init__(self, tokens: Iterable[str], open_methods: Iterable[str] = ()) -> None:
        self._tokens = [t.encode() for t in tokens]
        self._open = set(open_methods)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method in self._open:
            return handler
        auth = ""
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                auth = value if isinstance(value, str) else value.decode()
        if auth.startswith("Bearer ") and token_matches(auth[len("Bearer ") :], self._tokens):
            return handler
        reason = "missing bearer token" if not auth else "invalid bearer token"
        log.info("refused %s: %s", details.method, reason)
        return _deny(handler, f"{reason}: send metadata 'authorization: Bearer <token>'")


def _deny(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    async def abort(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def abort_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    kw = dict(
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(abort, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(abort_stream, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(abort, **kw)
    return grpc.stream_stream_rpc_method_handler(abort_stream, **kw)


def server_credentials(cert: str, key: str, client_ca: str) -> grpc.ServerCredentials:
    """TLS credentials; with `client_ca`, client certificates are required (mutual TLS)."""
    pair = [(Path(key).read_bytes(), Path(cert).read_bytes())]
    if client_ca:
        return grpc.ssl_server_credentials(
            pair, root_certificates=Path(client_ca).read_bytes(), require_client_auth=True
        )
    return grpc.ssl_server_credentials(pair)
