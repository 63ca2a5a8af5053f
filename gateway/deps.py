"""Typed dependencies routes declare: the verified client and the per-request gRPC metadata."""

from __future__ import annotations

import base64
import urllib.parse
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from gateway.errors import ApiError
from services.shared import auth
from services.shared.auth import Caller, TokenVerifier
from services.shared.errors import PermissionDenied, Unauthenticated


@dataclass(frozen=True)
class CallContext:
    """The verified caller and the metadata every downstream gRPC call carries."""

    caller: Caller
    metadata: tuple[tuple[str, str], ...]

    def require_scope(self, resource: str, interaction: str) -> None:
        try:
            self.caller.require_scope(resource, interaction)
        except PermissionDenied as exc:
            raise ApiError(403, exc.reason, exc.message) from None


def _header_text(request: Request, name: str, limit: int) -> str:
    """Percent-encoded UTF-8 header text (HTTP headers are not UTF-8 themselves)."""
    raw = request.headers.get(name, "")
    try:
        text = urllib.parse.unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise ApiError(400, "header-invalid", f"{name} must be percent-encoded UTF-8") from None
    if len(text) > limit:
        raise ApiError(400, "header-invalid", f"{name} is too long")
    return text


def call_context(request: Request) -> CallContext:
    verifier: TokenVerifier = request.app.state.verifier
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "token", "a bearer token is required", headers={"WWW-Authenticate": "Bearer"})
    try:
        claims = verifier.verify(token.strip())
    except Unauthenticated:
        raise ApiError(
            401,
            "token",
            "access token not accepted",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        ) from None
    if claims.get("org_type") == auth.PLATFORM:
        # Platform tokens are for calls between services, never from outside.
        raise ApiError(
            401,
            "token",
            "access token not accepted",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    purpose = request.headers.get("x-hie-purpose-of-use", "")
    if purpose and purpose not in auth.PURPOSES_OF_USE:
        raise ApiError(400, "purpose", "unknown purpose of use")
    name = _header_text(request, "x-hie-practitioner-name", 64)
    metadata = {
        "authorization": f"Bearer {token.strip()}",
        auth.PURPOSE_KEY: purpose,
        auth.PRACTITIONER_ID_KEY: _header_text(request, "x-hie-practitioner-id", 64),
        auth.PRACTITIONER_NAME_KEY: base64.b64encode(name.encode()).decode() if name else "",
        auth.ROLE_KEY: _header_text(request, "x-hie-practitioner-role", 32),
        auth.DEPARTMENT_KEY: base64.b64encode(
            _header_text(request, "x-hie-department", 64).encode()
        ).decode(),
        auth.CLIENT_ADDRESS_KEY: request.client.host if request.client else "",
    }
    caller = auth.caller_from_claims(claims, metadata)
    return CallContext(caller=caller, metadata=tuple((k, v) for k, v in metadata.items() if v))


Context = Annotated[CallContext, Depends(call_context)]
