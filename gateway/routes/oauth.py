"""OAuth2 token endpoint and discovery documents (SMART Backend Services)."""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from gateway.limits import retry_after
from gateway.smart import AuthorizationServer, OAuthError
from services.shared.keys import jwks, load_private_key

router = APIRouter(tags=["oauth2"])
_MAX_FORM_BYTES = 16 * 1024


@router.get("/.well-known/smart-configuration")
async def smart_configuration(request: Request) -> dict[str, Any]:
    server: AuthorizationServer = request.app.state.authorization
    return server.smart_configuration()


@router.get("/.well-known/jwks.json")
async def jwks_document(request: Request) -> dict[str, Any]:
    """The gateway's token-signing public keys (every key whose tokens may still be live)."""
    trusted = json.loads(request.app.state.settings.trusted_jwks_file.read_text())
    gateway_key = jwks(load_private_key(request.app.state.settings.gateway_signing_key_file))["keys"][0]
    # Publish only the gateway's keys, not the platform key services use among themselves.
    return {"keys": [k for k in trusted["keys"] if k["kid"] == gateway_key["kid"]]}


@router.post("/oauth2/token")
async def token(request: Request) -> JSONResponse:
    """RFC 6749 §4.4 client credentials, client authenticated by an RFC 7523 JWT assertion."""
    headers = {"Cache-Control": "no-store", "Pragma": "no-cache"}
    wait = request.app.state.buckets.take(f"token:{request.client.host if request.client else ''}")
    if wait:
        headers["Retry-After"] = retry_after(wait)
        return JSONResponse(
            {"error": "slow_down", "error_description": "too many token requests"}, status_code=429, headers=headers
        )
    body = await request.body()
    content_type = request.headers.get("content-type", "").split(";")[0].strip()
    try:
        if content_type != "application/x-www-form-urlencoded":
            raise OAuthError("invalid_request", "the token request must be application/x-www-form-urlencoded")
        if len(body) > _MAX_FORM_BYTES:
            raise OAuthError("invalid_request", "token request too large")
        try:
            pairs = urllib.parse.parse_qsl(body.decode("utf-8"), strict_parsing=False, max_num_fields=20)
        except (UnicodeDecodeError, ValueError):
            raise OAuthError("invalid_request", "token request is not a valid form") from None
        server: AuthorizationServer = request.app.state.authorization
        issued = await server.issue(dict(pairs))
    except OAuthError as exc:
        if exc.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse(
            {"error": exc.error, "error_description": exc.description},
            status_code=exc.status,
            headers=headers,
        )
    return JSONResponse(issued.response(), headers=headers)
