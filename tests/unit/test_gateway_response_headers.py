"""The gateway's trace and security headers and its request deadline (gateway/app.py,
`TraceAndSecurityHeaders`): a plain ASGI middleware since issue 21, with the behaviour of the
`@app.middleware("http")` function it replaced."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse, StreamingResponse

from gateway.app import TraceAndSecurityHeaders
from services.shared.config import Settings


def _app(*, timeout: float, public_url: str = "http://127.0.0.1:8400") -> FastAPI:
    app = FastAPI()

    @app.get("/quick")
    async def quick() -> PlainTextResponse:
        return PlainTextResponse("ok", headers={"Cache-Control": "max-age=60"})

    @app.get("/stuck")
    async def stuck() -> PlainTextResponse:
        await asyncio.sleep(30)
        return PlainTextResponse("late")

    @app.get("/slow-body")
    async def slow_body() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for piece in (b"a", b"b", b"c"):
                await asyncio.sleep(timeout)  # the whole body takes three deadlines
                yield piece

        return StreamingResponse(chunks(), media_type="text/plain")

    settings = dataclasses.replace(Settings.from_env(), request_timeout_seconds=timeout, public_url=public_url)
    app.add_middleware(TraceAndSecurityHeaders, settings=settings)
    return app


async def _get(app: Any, path: str) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        return await client.get(path)


@pytest.mark.asyncio
async def test_security_headers_on_every_response() -> None:
    response = await _get(_app(timeout=5), "/quick")
    assert response.status_code == 200
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"
    assert response.headers["cache-control"] == "max-age=60"  # a route's own is kept
    assert "strict-transport-security" not in response.headers
    https = await _get(_app(timeout=5, public_url="https://hie.example"), "/quick")
    assert https.headers["strict-transport-security"] == "max-age=31536000; includeSubDomains"


@pytest.mark.asyncio
async def test_a_request_not_answered_in_time_is_504_timeout_with_the_headers() -> None:
    response = await _get(_app(timeout=0.2), "/stuck")
    assert response.status_code == 504
    assert response.json()["error"]["reason"] == "timeout"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "no-store"


@pytest.mark.asyncio
async def test_the_deadline_ends_when_the_response_starts() -> None:
    response = await _get(_app(timeout=0.2), "/slow-body")
    assert response.status_code == 200
    assert response.text == "abc"
