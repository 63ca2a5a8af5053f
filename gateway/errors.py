"""The one place gRPC status codes become HTTP statuses and JSON / FHIR error bodies."""

from __future__ import annotations

from typing import Any

import grpc
from fastapi import Request
from fastapi.responses import JSONResponse

from services.shared.errors import REASON_METADATA_KEY
from services.shared.tracing import current_trace_ids

_HTTP_BY_GRPC: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 422,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
# FHIR R4 IssueType codes for each HTTP status.
_FHIR_ISSUE_BY_HTTP = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    406: "not-supported",
    409: "conflict",
    413: "too-long",
    415: "not-supported",
    422: "processing",
    429: "throttled",
    503: "transient",
    504: "timeout",
}


TRACE_ID_EXTENSION = "urn:hie:trace-id"


class ApiError(Exception):
    """An error the gateway answers with; message and reason are safe for clients."""

    def __init__(
        self,
        status: int,
        reason: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        issues: list[tuple[str, str]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.headers = headers or {}
        # FHIR element-level detail (FHIRPath expression, what is wrong), one OperationOutcome issue each.
        self.issues = issues or []


# What a client is told when a status came from the transport (no reason from a service's domain
# layer): the transport's own text names internal addresses and socket errors, never shown.
_TRANSPORT_ANSWERS: dict[int, tuple[str, str]] = {
    503: ("service-unavailable", "a service of the exchange is unavailable; retry shortly"),
    504: ("timeout", "a service of the exchange did not answer in time; retry shortly"),
    429: ("resource-exhausted", "the request exceeds what the exchange accepts now"),
}
# Seconds a client should wait before retrying a 503 (a restarted service is reachable again
# within about a second: the reconnect backoff is bounded in services/shared/clients.py).
RETRY_AFTER_SECONDS = 2


def from_rpc_error(exc: grpc.aio.AioRpcError) -> ApiError:
    """The client's answer to a failed call: a stable reason and a message written by us.

    A service's domain error carries its reason in trailing metadata and a message that is safe
    to show; anything else (connection refused, stream reset, deadline, message too large) is
    the transport's text and stays inside."""
    status = _HTTP_BY_GRPC.get(exc.code(), 500)
    reason = dict(exc.trailing_metadata() or ()).get(REASON_METADATA_KEY)
    if exc.code() == grpc.StatusCode.UNKNOWN and not isinstance(reason, str):
        # A call cut by a service that died mid-request ("Stream removed"): our services never
        # answer UNKNOWN themselves (unexpected errors are INTERNAL), so a retry may well succeed.
        status = 503
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 503 else None
    if status == 500:
        # Server faults and data-integrity failures: the detail stays inside.
        return ApiError(500, reason if isinstance(reason, str) else "internal", "the exchange could not complete this")
    if not isinstance(reason, str):
        reason, message = _TRANSPORT_ANSWERS.get(status, (exc.code().name.lower(), "request not served"))
        return ApiError(status, reason, message, headers=headers)
    return ApiError(status, reason, exc.details() or "", headers=headers)


def error_body(request: Request, error: ApiError) -> dict[str, Any]:
    trace_id, _ = current_trace_ids()
    if request.url.path.startswith("/fhir/"):
        code = _FHIR_ISSUE_BY_HTTP.get(error.status, "exception")
        details = {"coding": [{"system": "urn:hie:error-reason", "code": error.reason}]}
        issues = [{"severity": "error", "code": code, "details": details, "diagnostics": error.message}]
        issues += [
            {"severity": "error", "code": "structure", "diagnostics": text, "expression": [expression]}
            for expression, text in error.issues
        ]
        return {
            "resourceType": "OperationOutcome",
            "issue": issues,
            # The trace id an operator finds the exchange by (also in the X-Trace-Id header).
            **({"extension": [{"url": TRACE_ID_EXTENSION, "valueString": trace_id}]} if trace_id else {}),
        }
    return {
        "error": {
            "status": error.status,
            "reason": error.reason,
            "message": error.message,
            "trace_id": trace_id,
        }
    }


def error_response(request: Request, error: ApiError) -> JSONResponse:
    request.scope["hie.error_reason"] = error.reason  # the metrics' errors-by-reason (gateway/metrics.py)
    media = "application/fhir+json" if request.url.path.startswith("/fhir/") else "application/json"
    return JSONResponse(error_body(request, error), status_code=error.status, headers=error.headers, media_type=media)
