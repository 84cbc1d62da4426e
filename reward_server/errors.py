"""Service errors: each class names the gRPC status code it becomes (docs/ARCHITECTURE.md,
"Status codes"; the cases behind each code are in docs/API.md, "Status codes").

The model layer, the batcher, the registry and the engine raise these; they import no grpc. The
one place that maps them onto gRPC status codes is `reward_server.serve.status`. Credentials are
checked before a request reaches the servicer (`reward_server.serve.auth` answers UNAUTHENTICATED
itself), and a client that goes away cancels its call: neither needs a class here.
"""

from __future__ import annotations

from typing import ClassVar


class ServiceError(Exception):
    """Base class; `code` names the gRPC status code this error becomes (INTERNAL here, each
    subclass sets its own with ``class X(ServiceError, code="...")``)."""

    code: ClassVar[str] = "INTERNAL"

    def __init_subclass__(cls, *, code: str, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.code = code

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError, code="INVALID_ARGUMENT"):
    """Malformed request: empty batch or text, id out of vocabulary, over a limit, unknown model."""


class FailedPrecondition(ServiceError, code="FAILED_PRECONDITION"):
    """Tokenizer fingerprint mismatch; the model exists but has the wrong role for this RPC."""


class PermissionDenied(ServiceError, code="PERMISSION_DENIED"):
    """Valid credentials that do not allow this: another tenant's telemetry (GetStats)."""


class ResourceExhausted(ServiceError, code="RESOURCE_EXHAUSTED"):
    """Queue full / over the concurrency limit: the client may retry with backoff."""


class Unavailable(ServiceError, code="UNAVAILABLE"):
    """Draining on shutdown or not ready yet: retry elsewhere."""


class DeadlineExceeded(ServiceError, code="DEADLINE_EXCEEDED"):
    """The client's deadline passed before the work reached the model."""
