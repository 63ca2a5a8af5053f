"""Bearer token verification and the caller context every service acts for.

No service trusts the network: each verifies the bearer token itself against the trusted
JWKS (the gateway's token key and the platform key services use for their own calls).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt

from hie.common.v1 import common_pb2
from services.shared.config import TOKEN_AUDIENCE
from services.shared.errors import PermissionDenied, Unauthenticated
from services.shared.keys import (
    ISSUER_MEMBER,
    RETIRED_KEY_RETENTION_SECONDS,
    RETIRED_MEMBER,
    PrivateKey,
    algorithm_for,
    load_private_key,
    public_jwk,
)
from services.shared.user_assertion import (
    PURPOSES_OF_USE,
    VERIFIED_USER_AUDIENCE,
    ActingUser,
    user_from_statement,
    verify_user_assertion,
)

# Asymmetric algorithms only: "none" and HMAC (algorithm confusion) are never accepted.
ACCEPTED_ALGORITHMS = ["ES384", "ES256", "RS384", "RS256"]
# Metadata keys: the hospital's signed user assertion, and the client's network address as
# the gateway saw it (for audit records).
USER_ASSERTION_KEY = "x-hie-user-assertion"
CLIENT_ADDRESS_KEY = "x-hie-client-address"
# The gateway's signed statement of the user assertion it verified (user_assertion.py,
# `user_statement_claims`): what the gateway forwards to services instead of the assertion.
VERIFIED_USER_KEY = "x-hie-verified-user"
FORWARDED_KEYS = ("authorization", USER_ASSERTION_KEY, VERIFIED_USER_KEY, CLIENT_ADDRESS_KEY)
PLATFORM = "platform"
_VERIFIED_CACHE_SIZE = 10_000


@dataclass(frozen=True)
class Caller:
    """The verified organisation and client, and the asserted acting person and purpose."""

    organization_id: str
    organization_type: str
    client_id: str
    scopes: frozenset[str] = field(default_factory=frozenset)
    practitioner_id: str = ""
    practitioner_name: str = ""
    role: str = ""
    department: str = ""
    purpose_of_use: str = ""
    client_address: str = ""
    # RFC 7638 thumbprints of the organisation's registered keys (the token's `client_jkt`): a
    # statement the hospital signs (a user assertion, a report's signature) is checked against them.
    key_thumbprints: frozenset[str] = field(default_factory=frozenset)

    @property
    def is_platform(self) -> bool:
        return self.organization_type == PLATFORM

    def to_proto(self) -> common_pb2.CallerContext:
        return common_pb2.CallerContext(
            organization_id=self.organization_id,
            organization_type=self.organization_type,
            client_id=self.client_id,
            practitioner_id=self.practitioner_id,
            practitioner_name=self.practitioner_name,
            role=self.role,
            department=self.department,
            purpose_of_use=self.purpose_of_use,
            scopes=sorted(self.scopes),
        )

    def require_scope(self, resource: str, interaction: str) -> None:
        """SMART v2 scopes: `system/<Resource>.<cruds>`; a wildcard resource matches any."""
        for scope in self.scopes:
            context, _, rest = scope.partition("/")
            name, _, perms = rest.partition(".")
            if context == "system" and name in {resource, "*"} and interaction in perms:
                return
        raise PermissionDenied(f"scope system/{resource}.{interaction} required", reason="scope")

    def require_purpose(self) -> str:
        if self.purpose_of_use not in PURPOSES_OF_USE:
            raise PermissionDenied("a user assertion with a purpose of use is required", reason="purpose")
        return self.purpose_of_use

    def require_role(self, *roles: str) -> None:
        """Role per operation, from the verified user assertion. An exchange service calling for
        itself has no user: it acts inside an operation whose caller it already checked."""
        if self.is_platform:
            return
        if self.role not in roles:
            raise PermissionDenied(f"this operation needs the role {' or '.join(roles)}", reason="role")


current_caller: ContextVar[Caller | None] = ContextVar("current_caller", default=None)
# The incoming request's metadata to forward on service-to-service calls.
forwarded_metadata: ContextVar[tuple[tuple[str, str], ...]] = ContextVar("forwarded_metadata", default=())


def caller() -> Caller:
    """The caller of the request being handled."""
    value = current_caller.get()
    if value is None:
        raise Unauthenticated("no verified caller")
    return value


class TokenVerifier:
    """Verifies access tokens against a JWKS file, re-reading it when it changes (key rotation)."""

    def __init__(self, jwks_file: Path, *, audience: str = TOKEN_AUDIENCE) -> None:
        self._file = jwks_file
        self._audience = audience
        self._mtime = -1.0
        self._keys: dict[str, jwt.PyJWK] = {}
        self._verified: dict[str, dict[str, Any]] = {}
        self._signers: dict[str, str] = {}
        self._retired: dict[str, float] = {}
        # Verifies the gateway's verified-user statements (their own audience), made on first use.
        self._statements: TokenVerifier | None = None

    def _load(self) -> None:
        mtime = self._file.stat().st_mtime
        if mtime != self._mtime:
            data = json.loads(self._file.read_text())
            self._verified.clear()
            self._keys = {k["kid"]: jwt.PyJWK(k) for k in data["keys"]}
            self._signers = {k["kid"]: k.get(ISSUER_MEMBER, "gateway") for k in data["keys"]}
            self._retired = {k["kid"]: float(k[RETIRED_MEMBER]) for k in data["keys"] if RETIRED_MEMBER in k}
            self._mtime = mtime

    def verify(self, token: str) -> dict[str, Any]:
        """The claims of a valid token; Unauthenticated otherwise (with no detail of why).

        A token verified once is remembered until it expires (or the trusted keys change):
        its signature cannot change, and re-checking it on every hop of every call would
        cost more than the rest of the call.
        """
        self._load_safely()
        cached = self._verified.get(token)
        if cached is not None and cached["exp"] > time.time():
            return cached
        self._verified.pop(token, None)
        claims = self._verify_signature(token)
        if len(self._verified) >= _VERIFIED_CACHE_SIZE:
            self._verified.clear()
        self._verified[token] = claims
        return claims

    def _load_safely(self) -> None:
        try:
            self._load()
        except (OSError, ValueError, KeyError, jwt.PyJWTError) as exc:
            raise Unauthenticated("access token not accepted", reason="token") from exc

    def _verify_signature(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
            key = self._keys.get(header.get("kid", ""))
            retired_at = self._retired.get(header.get("kid", ""))
            if retired_at is not None and time.time() > retired_at + RETIRED_KEY_RETENTION_SECONDS:
                key = None
            alg = header.get("alg")
            if key is None or alg not in ACCEPTED_ALGORITHMS or not alg_fits_key(alg, key.key_type):
                raise Unauthenticated("access token not accepted", reason="token")
            claims = jwt.decode(
                token,
                key=key.key,
                algorithms=[alg],
                audience=self._audience,
                options={"require": ["exp", "iat", "iss", "sub", "aud"]},
                leeway=5,
            )
        except (jwt.PyJWTError, TypeError, ValueError) as exc:
            raise Unauthenticated("access token not accepted", reason="token") from exc
        # A key signs only for its own signer: the platform key never vouches for a hospital.
        signer = self._signers.get(header["kid"])
        if (signer == "platform") != (claims.get("org_type") == PLATFORM):
            raise Unauthenticated("access token not accepted", reason="token")
        return claims

    def verify_platform_statement(self, jws: str) -> dict[str, Any]:
        """The claims of a statement the platform signed (an audit checkpoint); ValueError if the
        signature is not by a trusted platform key."""
        self._load_safely()
        try:
            header = jwt.get_unverified_header(jws)
            key = self._keys.get(header.get("kid", ""))
            if key is None or self._signers.get(header["kid"]) != "platform":
                raise ValueError("not signed by a platform key")
            if header.get("alg") not in ACCEPTED_ALGORITHMS or not alg_fits_key(header["alg"], key.key_type):
                raise ValueError("algorithm not accepted")
            return jwt.decode(jws, key=key.key, algorithms=[header["alg"]], options={"verify_aud": False})
        except (jwt.PyJWTError, TypeError, KeyError) as exc:
            raise ValueError("statement signature does not verify") from exc

    def caller_from_metadata(self, metadata: Mapping[str, str | bytes]) -> Caller:
        auth = metadata.get("authorization")
        if not isinstance(auth, str) or not auth.startswith("Bearer "):
            raise Unauthenticated("bearer token required", reason="token")
        token = auth.removeprefix("Bearer ").strip()
        claims = self.verify(token)
        statement = _text(metadata, VERIFIED_USER_KEY)
        if statement:
            return caller_from_claims(claims, metadata, user=self.verified_user(statement, token, claims))
        return caller_from_claims(claims, metadata)

    def verified_user(self, statement: str, token: str, token_claims: Mapping[str, Any]) -> ActingUser:
        """The user the gateway's statement vouches for: signed by a trusted gateway key (never a
        platform key: the signer check in `_verify_signature`), with the statement audience, for
        this very access token and client. Verified once per statement, like an access token."""
        if self._statements is None:
            self._statements = TokenVerifier(self._file, audience=VERIFIED_USER_AUDIENCE)
        try:
            claims = self._statements.verify(statement)
        except Unauthenticated:
            raise Unauthenticated("verified user statement not accepted", reason="user-assertion") from None
        return user_from_statement(claims, token=token, token_claims=token_claims)


def alg_fits_key(alg: str, key_type: str) -> bool:
    """ES* only with EC keys, RS* only with RSA keys (no algorithm / key confusion)."""
    return {"ES": "EC", "RS": "RSA"}.get(alg[:2]) == key_type


def _text(metadata: Mapping[str, str | bytes], key: str) -> str:
    value = metadata.get(key, "")
    return value if isinstance(value, str) else ""


def caller_from_claims(
    claims: Mapping[str, Any], metadata: Mapping[str, str | bytes], *, user: ActingUser | None = None
) -> Caller:
    """Organisation and client from the access token; person and purpose from the hospital's
    signed user assertion, verified here (a request without one acts as the system alone), or
    `user` as the gateway's verified statement of it says."""
    if user is None:
        assertion = _text(metadata, USER_ASSERTION_KEY)
        user = verify_user_assertion(assertion, claims) if assertion else None
    return Caller(
        organization_id=str(claims.get("org", "")),
        organization_type=str(claims.get("org_type", "")),
        client_id=str(claims.get("client_id", claims.get("sub", ""))),
        scopes=frozenset(str(claims.get("scope", "")).split()),
        practitioner_id=user.practitioner_id if user else "",
        practitioner_name=user.name if user else "",
        role=user.role if user else "",
        department=user.department if user else "",
        purpose_of_use=user.purpose_of_use if user else "",
        client_address=_text(metadata, CLIENT_ADDRESS_KEY)[:64],
        key_thumbprints=frozenset(str(k) for k in claims.get("client_jkt", ()) or ()),
    )


class PlatformCredentials:
    """Short-lived tokens a service signs for its own calls (outbox relays, background work)."""

    lifetime_seconds = 300

    def __init__(self, key: PrivateKey, *, service: str, issuer: str) -> None:
        self._key = key
        self._kid = public_jwk(key)["kid"]
        self._alg = algorithm_for(key)
        self._service = service
        self._issuer = issuer
        self._token = ""
        self._expires = 0.0

    @classmethod
    def from_file(cls, path: Path, *, service: str, issuer: str) -> PlatformCredentials:
        return cls(load_private_key(path), service=service, issuer=issuer)

    def token(self) -> str:
        now = time.time()
        if now > self._expires - 60:
            self._expires = now + self.lifetime_seconds
            claims = {
                "iss": self._issuer,
                "sub": f"service:{self._service}",
                "aud": TOKEN_AUDIENCE,
                "iat": int(now),
                "exp": int(self._expires),
                "jti": str(uuid.uuid4()),
                "org": PLATFORM,
                "org_type": PLATFORM,
                "client_id": f"service:{self._service}",
                "scope": "system/*.cruds",
            }
            self._token = jwt.encode(claims, self._key, algorithm=self._alg, headers={"kid": self._kid})
        return self._token

    def sign_statement(self, claims: Mapping[str, Any], *, typ: str) -> str:
        """A compact JWS over `claims` with the platform key (e.g. an audit checkpoint)."""
        return jwt.encode(dict(claims), self._key, algorithm=self._alg, headers={"kid": self._kid, "typ": typ})

    def metadata(self) -> Sequence[tuple[str, str]]:
        return (("authorization", f"Bearer {self.token()}"),)
