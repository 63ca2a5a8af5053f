"""Per-client rate limits (token bucket) and request body size limits."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from gateway.errors import TRACE_ID_EXTENSION
from services.shared.tracing import current_trace_ids

# What a document submission may carry: 50 MB of content, base64-encoded, plus metadata.
DOCUMENT_BODY_LIMIT = 70 * 1024 * 1024
DEFAULT_BODY_LIMIT = 1024 * 1024
_DOCUMENT_PATHS = ("/api/v1/documents", "/fhir/R4")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class TokenBuckets:
    """One bucket per key: `rate` tokens a second, holding at most `burst`.

    In memory, per gateway replica: a region running N replicas behind a balancer grants
    each client up to N times the rate (a shared store such as Redis would make it exact).
    """

    def __init__(self, *, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> float:
        """0 if a request may proceed now, else the seconds until it may."""
        now = time.monotonic()
        tokens, last = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens >= 1:
            self._buckets[key] = (tokens - 1, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > 100_000:
            self._buckets.clear()
        return (1 - tokens) / self.rate if self.rate > 0 else 60.0


def retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


class BodySizeLimit:
    """Refuses bodies over the route's limit with 413, counting what is streamed as well as
    trusting no Content-Length."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        limit = DOCUMENT_BODY_LIMIT if path.startswith(_DOCUMENT_PATHS) else DEFAULT_BODY_LIMIT
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await _too_large(scope, send)
            return
        received = 0

        async def counted() -> MutableMapping[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _BodyTooLarge:
            await _too_large(scope, send)


class _BodyTooLarge(Exception):
    pass


async def _too_large(scope: Scope, send: Send) -> None:
    # Refused before the routes (and their security-headers middleware) run, so this answer
    # carries the trace id itself, in the body and in X-Trace-Id, like every other refusal.
    trace_id, _ = current_trace_ids()
    fhir = str(scope.get("path", "")).startswith("/fhir/")
    body = (
        {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "too-long", "diagnostics": "request body too large"}],
            **({"extension": [{"url": TRACE_ID_EXTENSION, "valueString": trace_id}]} if trace_id else {}),
        }
        if fhir
        else {
            "error": {
                "status": 413,
                "reason": "body-too-large",
                "message": "request body too large",
                "trace_id": trace_id,
            }
        }
    )
    payload = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/fhir+json" if fhir else b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        (b"connection", b"close"),
    ]
    if trace_id:
        headers.append((b"x-trace-id", trace_id.encode()))
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
