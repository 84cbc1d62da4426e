"""The one mapping from service errors to status codes, gRPC and HTTP (docs/ARCHITECTURE.md,
"Status codes"; the gRPC servicer and the HTTP door are its only callers)."""

from __future__ import annotations

import grpc

from reward_server.errors import ServiceError

HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "FAILED_PRECONDITION": 412,
    "RESOURCE_EXHAUSTED": 429,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
"""gRPC code name -> HTTP status of the HTTP/JSON door (docs/API.md, "HTTP/JSON front door")."""


def grpc_code(err: ServiceError) -> grpc.StatusCode:
    """The status code named by a service error's `code` (INTERNAL for anything unknown)."""
    return grpc.StatusCode.__members__.get(err.code, grpc.StatusCode.INTERNAL)


def http_status(code: str) -> int:
    """The HTTP status for a gRPC code name (500 for anything unknown)."""
    return HTTP_STATUS.get(code, 500)
