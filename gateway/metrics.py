"""Request metrics of the gateway: one pure ASGI middleware (no per-request objects beyond what
the recording needs) counting requests, their latency and error answers per templated route.

The route is the template the router matched (`/api/v1/documents/{document_id}`), "unmatched"
when none did: a raw path can carry a patient's local id and would grow the series without bound.
The error reason is the machine-readable one the answer carries (set by `gateway.errors`).
"""

from __future__ import annotations

import time
from typing import Any

from services.shared.metrics import HTTP_DURATION, HTTP_ERRORS, HTTP_REQUESTS

REASON_SCOPE_KEY = "hie.error_reason"
# Probes are answered too often to be worth a series (and are watched by their own prober).
_UNMEASURED = frozenset({"/healthz", "/readyz"})


class RequestMetrics:
    """ASGI middleware recording `hie.http.server.*` for every HTTP request."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in _UNMEASURED:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            elapsed = time.perf_counter() - start
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope["method"]
            HTTP_REQUESTS.add(1, {"route": route, "method": method, "status": str(status)})
            HTTP_DURATION.record(elapsed, {"route": route, "method": method})
            if status >= 400:
                reason = scope.get(REASON_SCOPE_KEY) or ("internal" if status >= 500 else "http")
                HTTP_ERRORS.add(1, {"route": route, "status": str(status), "reason": reason})


def note_reason(scope: dict[str, Any], reason: str) -> None:
    """Remember an error answer's reason for the request's metrics."""
    scope[REASON_SCOPE_KEY] = reason
