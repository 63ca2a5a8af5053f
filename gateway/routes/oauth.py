"""OAuth2 token endpoint and discovery documents (SMART Backend Services)."""

from __future__ import annotations

import json
import time
import urllib.parse
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from gateway.console.authorization import USER_GRANT_TYPES
from gateway.console.state import console_state
from gateway.limits import retry_after
from gateway.smart import AuthorizationServer, OAuthError
from services.shared.keys import ISSUER_MEMBER, RETIRED_KEY_RETENTION_SECONDS, RETIRED_MEMBER

router = APIRouter(tags=["oauth2"])
_MAX_FORM_BYTES = 16 * 1024


@router.get("/.well-known/smart-configuration")
@router.get("/fhir/R4/.well-known/smart-configuration")
async def smart_configuration(request: Request) -> dict[str, Any]:
    """SMART discovery. SMART App Launch 2.x (conformance): "the server SHALL ... host a
    smart-configuration JSON document at [base]/.well-known/smart-configuration" where [base] is
    the FHIR base URL; it is also served at the server root, where clients used to look."""
    server: AuthorizationServer = request.app.state.authorization
    return server.smart_configuration()


@router.get("/.well-known/jwks.json")
async def jwks_document(request: Request) -> dict[str, Any]:
    """The gateway's token-signing public keys: the current one and retired ones whose tokens
    may still be live (not the platform key services use among themselves)."""
    trusted = json.loads(request.app.state.settings.trusted_jwks_file.read_text())
    cutoff = time.time() - RETIRED_KEY_RETENTION_SECONDS
    return {
        "keys": [
            {k: v for k, v in key.items() if k not in {ISSUER_MEMBER, RETIRED_MEMBER}}
            for key in trusted["keys"]
            if key.get(ISSUER_MEMBER) == "gateway" and key.get(RETIRED_MEMBER, cutoff + 1) > cutoff
        ]
    }


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
        params = dict(pairs)
        if params.get("grant_type") in USER_GRANT_TYPES:
            # People (the console's sign-in): authorization code + PKCE, refresh tokens.
            status, body = await console_state(request.app).authorization.token(
                params, client_address=request.client.host if request.client else ""
            )
            return JSONResponse(body, status_code=status, headers=headers)
        server: AuthorizationServer = request.app.state.authorization
        issued = await server.issue(dict(pairs), client_address=request.client.host if request.client else "")
    except OAuthError as exc:
        if exc.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse(
            {"error": exc.error, "error_description": exc.description},
            status_code=exc.status,
            headers=headers,
        )
    return JSONResponse(issued.response(), headers=headers)
