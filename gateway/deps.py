"""Typed dependencies routes declare: the verified client and acting user, and the metadata
every downstream gRPC call carries."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request

from gateway import store
from gateway.errors import ApiError
from gateway.limits import retry_after
from services.shared import auth
from services.shared.auth import Caller, TokenVerifier
from services.shared.errors import PermissionDenied, Unauthenticated
from services.shared.tracing import annotate_caller
from services.shared.user_assertion import check_user_assertion

USER_ASSERTION_HEADER = "x-hie-user-assertion"
_INVALID_TOKEN = {"WWW-Authenticate": 'Bearer error="invalid_token"'}


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


async def call_context(request: Request) -> CallContext:
    """Verify the access token, the organisation's standing and the user assertion."""
    verifier: TokenVerifier = request.app.state.verifier
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "token", "a bearer token is required", headers={"WWW-Authenticate": "Bearer"})
    try:
        claims = verifier.verify(token)
    except Unauthenticated:
        raise ApiError(401, "token", "access token not accepted", headers=_INVALID_TOKEN) from None
    if claims.get("org_type") == auth.PLATFORM or claims.get("iss") != request.app.state.settings.public_url:
        # Platform tokens are for calls between services, never from outside.
        raise ApiError(401, "token", "access token not accepted", headers=_INVALID_TOKEN)
    client_id = str(claims.get("client_id", ""))
    wait = request.app.state.buckets.take(client_id)
    if wait:
        raise ApiError(429, "rate-limited", "too many requests", headers={"Retry-After": retry_after(wait)})
    if not await request.app.state.standing.is_active(client_id):
        raise ApiError(401, "token", "the client or organisation has been revoked", headers=_INVALID_TOKEN)
    assertion = request.headers.get(USER_ASSERTION_HEADER, "").strip()
    if not assertion:
        raise ApiError(401, "user-assertion", "a signed user assertion (X-HIE-User-Assertion) is required")
    client_address = request.client.host if request.client else ""
    try:
        # Decoded and verified once here; the replay check takes its jti and expiry from it.
        verified = check_user_assertion(assertion, claims)
    except Unauthenticated as exc:
        raise ApiError(401, exc.reason, exc.message) from None
    caller = auth.caller_from_claims(claims, {auth.CLIENT_ADDRESS_KEY: client_address}, user=verified.user)
    await _refuse_replay(request, verified.jti, verified.expires, client_id)
    annotate_caller(caller)
    # The services get the gateway's signed statement of the verified assertion, not the
    # assertion: they check a signature once per token and user instead of once per request.
    statement = request.app.state.authorization.verified_user_statement(token=token, token_claims=claims, caller=caller)
    metadata = {
        "authorization": f"Bearer {token}",
        auth.VERIFIED_USER_KEY: statement,
        auth.CLIENT_ADDRESS_KEY: client_address,
    }
    return CallContext(caller=caller, metadata=tuple((k, v) for k, v in metadata.items() if v))


async def _refuse_replay(request: Request, jti: str, expires: float, client_id: str) -> None:
    """A user assertion vouches for one request: its jti is remembered until it expires and a
    second use by the same client is refused, as the token endpoint does for client assertions
    (RFC 7523 §3 (7))."""
    ledger: store.UserAssertionLedger = request.app.state.assertion_ledger
    fresh = await ledger.remember(
        jti=jti, client_id=client_id, expires_at=datetime.datetime.fromtimestamp(expires, tz=datetime.UTC)
    )
    if not fresh:
        raise ApiError(401, "user-assertion-replayed", "this user assertion was already used: sign one per request")


Context = Annotated[CallContext, Depends(call_context)]


_KEY_SCHEMA = {"maxLength": 128, "pattern": "^[\\x20-\\x7e\\xa1-\\xac\\xae-\\xff]*$"}


def _idempotency_key(
    key: Annotated[
        str,
        Header(
            alias="Idempotency-Key",
            description=(
                "At most 128 printable characters. A retry of the same request with the same key "
                "gets the first response (status and body); the same key with another request is "
                "409 idempotency-key-reused (gateway/README.md, Idempotency-Key)."
            ),
            # Stated for clients; the owning service checks it (400 idempotency-key-invalid). A
            # header is Latin-1: printable as Python's str.isprintable() (the service's check).
            json_schema_extra=_KEY_SCHEMA,
        ),
    ] = "",
) -> str:
    """The request's Idempotency-Key as given (the owning service checks and keeps it)."""
    # Only a bound on what is forwarded: a longer key still reaches the service too long and is
    # refused there (400 idempotency-key-invalid) rather than cut to a key it was not.
    return key[:129]


# Declared on every write route, so the OpenAPI document lists the header on each of them
# (tests/e2e/test_idempotency_routes.py walks the document).
IdempotencyKey = Annotated[str, Depends(_idempotency_key)]
