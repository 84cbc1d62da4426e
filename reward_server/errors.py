"""Service errors, one class per status code of DESIGN.md's table.

The model layer, the batcher and the validation code raise these; they import no grpc. The one
place that maps them onto gRPC status codes is `reward_server.status`.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base class; `code` names the gRPC status code this error becomes."""

    code = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    """Malformed request: empty batch or text, id out of vocabulary, over a limit, unknown model."""

    code = "INVALID_ARGUMENT"


class FailedPrecondition(ServiceError):
    """Tokenizer fingerprint mismatch; the model exists but has the wrong role for this RPC."""

    code = "FAILED_PRECONDITION"


class ResourceExhausted(ServiceError):
    """Queue full / over the concurrency limit: the client may retry with backoff."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(ServiceError):
    """Draining on shutdown or not ready yet: retry elsewhere."""

    code = "UNAVAILABLE"


class Unauthenticated(ServiceError):
    """Missing or wrong credentials."""

    code = "UNAUTHENTICATED"


class DeadlineExceeded(ServiceError):
    """The client's deadline passed before the work reached the model."""

    code = "DEADLINE_EXCEEDED"


class Cancelled(ServiceError):
    """The client went away before the work reached the model."""

    code = "CANCELLED"
