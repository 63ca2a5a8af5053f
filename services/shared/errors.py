"""Domain errors and the one table that maps them to gRPC status codes.

A domain error's message is written by us and is safe to show a client: it never
contains patient data. Anything else that escapes a handler becomes INTERNAL with a
generic message.
"""

from __future__ import annotations

import grpc

# Trailing metadata key carrying a machine-readable reason next to the status code.
REASON_METADATA_KEY = "hie-error-reason"


class DomainError(Exception):
    """Base of the errors a service's domain raises on purpose."""

    default_reason = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason


class InvalidArgument(DomainError):
    default_reason = "invalid"


class NotFound(DomainError):
    default_reason = "not-found"


class AlreadyExists(DomainError):
    default_reason = "exists"


class FailedPrecondition(DomainError):
    default_reason = "precondition"


class PermissionDenied(DomainError):
    default_reason = "forbidden"


class Unauthenticated(DomainError):
    default_reason = "unauthenticated"


class DataCorruption(DomainError):
    """Stored data failed its integrity check: never served as good data."""

    default_reason = "integrity"


class Unavailable(DomainError):
    """A service this one depends on did not answer."""

    default_reason = "unavailable"


_STATUS_BY_ERROR: dict[type[DomainError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    DataCorruption: grpc.StatusCode.DATA_LOSS,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def status_for(error: DomainError) -> grpc.StatusCode:
    """The gRPC status code of a domain error (its nearest mapped base class)."""
    for cls in type(error).__mro__:
        if cls in _STATUS_BY_ERROR:
            return _STATUS_BY_ERROR[cls]
    return grpc.StatusCode.UNKNOWN


def error_from_rpc(exc: grpc.aio.AioRpcError) -> DomainError:
    """Turn a downstream service's error back into a domain error, keeping its reason."""
    reason = dict(exc.trailing_metadata() or ()).get(REASON_METADATA_KEY)
    if not isinstance(reason, str):
        # Not a peer's domain error but the transport's (connection refused, stream reset): its
        # text names internal addresses and is never passed on.
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            return Unavailable("a dependent service is unavailable", reason="service-unavailable")
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return Unavailable("a dependent service timed out", reason="timeout")
        return Unavailable("a dependent service failed", reason="upstream")
    for cls, code in _STATUS_BY_ERROR.items():
        if code == exc.code():
            return cls(exc.details() or code.name.lower(), reason=reason)
    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Unavailable("a dependent service timed out", reason="timeout")
    return Unavailable("a dependent service failed", reason="upstream")
