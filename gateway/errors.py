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


def from_rpc_error(exc: grpc.aio.AioRpcError) -> ApiError:
    status = _HTTP_BY_GRPC.get(exc.code(), 500)
    reason = dict(exc.trailing_metadata() or ()).get(REASON_METADATA_KEY)
    if status == 500:
        # Server faults and data-integrity failures: the detail stays inside.
        return ApiError(500, reason if isinstance(reason, str) else "internal", "the exchange could not complete this")
    return ApiError(status, reason if isinstance(reason, str) else exc.code().name.lower(), exc.details() or "")


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
        return {"resourceType": "OperationOutcome", "issue": issues}
    return {
        "error": {
            "status": error.status,
            "reason": error.reason,
            "message": error.message,
            "trace_id": trace_id,
        }
    }


def error_response(request: Request, error: ApiError) -> JSONResponse:
    media = "application/fhir+json" if request.url.path.startswith("/fhir/") else "application/json"
    return JSONResponse(error_body(request, error), status_code=error.status, headers=error.headers, media_type=media)
