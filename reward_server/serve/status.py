"""The one mapping from service errors to gRPC status codes (docs/ARCHITECTURE.md, "Status
codes"; the servicer is its only caller)."""

from __future__ import annotations

import grpc

from reward_server.errors import ServiceError


def grpc_code(err: ServiceError) -> grpc.StatusCode:
    """The status code named by a service error's `code` (INTERNAL for anything unknown)."""
    return grpc.StatusCode.__members__.get(err.code, grpc.StatusCode.INTERNAL)
