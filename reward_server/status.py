"""The one mapping from service errors to gRPC status codes (DESIGN.md's table)."""

from __future__ import annotations

import grpc

from reward_server.errors import ServiceError

_CODES = {
    "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
    "FAILED_PRECONDITION": grpc.StatusCode.FAILED_PRECONDITION,
    "RESOURCE_EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
    "UNAUTHENTICATED": grpc.StatusCode.UNAUTHENTICATED,
    "DEADLINE_EXCEEDED": grpc.StatusCode.DEADLINE_EXCEEDED,
    "CANCELLED": grpc.StatusCode.CANCELLED,
    "INTERNAL": grpc.StatusCode.INTERNAL,
}


def grpc_code(err: ServiceError) -> grpc.StatusCode:
    """The status code for a service error (INTERNAL for anything unknown)."""
    return _CODES.get(err.code, grpc.StatusCode.INTERNAL)
