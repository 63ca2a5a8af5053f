"""The acting person and purpose of use, asserted by the member hospital per request
(IHE IUA / XUA in spirit: the hospital vouches for its user; the exchange verifies the
hospital's signature).

A user assertion is a JWT the hospital signs with one of its registered keys:

    header   alg (ES384 / RS384 / ES256 / RS256), kid, jwk (the public key, RFC 7515 §4.1.3)
    claims   iss  the hospital's OAuth2 client id (must equal the access token's client)
             sub  the practitioner's id in the hospital
             aud  urn:hie:exchange
             iat, exp (at most one hour apart), jti
             name, role, department, purpose_of_use

The access token lists the RFC 7638 thumbprints of the client's registered keys
(`client_jkt`), so any service can check, with no lookup, that the assertion was signed by
a key registered to the same client the token was issued to.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt

from services.shared.config import TOKEN_AUDIENCE
from services.shared.errors import Unauthenticated
from services.shared.keys import thumbprint

ACCEPTED_ALGORITHMS = ["ES384", "ES256", "RS384", "RS256"]
PURPOSES_OF_USE = frozenset(
    {"treatment", "referral", "consultation", "emergency", "research", "public-health", "audit", "operations"}
)
ROLES = frozenset({"doctor", "nurse", "pharmacist", "technician", "data-steward", "auditor", "admin"})
MAX_LIFETIME_SECONDS = 3600
_LEEWAY = 5


@dataclass(frozen=True)
class ActingUser:
    practitioner_id: str
    name: str
    role: str
    department: str
    purpose_of_use: str


def _refuse(message: str) -> Unauthenticated:
    return Unauthenticated(message, reason="user-assertion")


_verified: dict[tuple[str, str, tuple[str, ...]], tuple[float, ActingUser]] = {}
_CACHE_SIZE = 10_000


def verify_user_assertion(assertion: str, token_claims: Mapping[str, Any]) -> ActingUser:
    """Check the assertion against the verified access token's claims; Unauthenticated otherwise.

    A verified assertion is remembered, for the same client and registered keys, until it expires.
    """
    key = (assertion, str(token_claims.get("client_id", "")), tuple(token_claims.get("client_jkt", ())))
    cached = _verified.get(key)
    if cached is not None and cached[0] > time.time():
        return cached[1]
    user, expires = _verify(assertion, token_claims)
    if len(_verified) >= _CACHE_SIZE:
        _verified.clear()
    _verified[key] = (expires, user)
    return user


def _verify(assertion: str, token_claims: Mapping[str, Any]) -> tuple[ActingUser, float]:
    try:
        header = jwt.get_unverified_header(assertion)
    except jwt.PyJWTError:
        raise _refuse("user assertion is not a valid JWT") from None
    jwk = header.get("jwk")
    if header.get("alg") not in ACCEPTED_ALGORITHMS or not isinstance(jwk, dict):
        raise _refuse("user assertion needs an asymmetric alg and its jwk header")
    if "d" in jwk or jwk.get("kty") not in {"EC", "RSA"}:
        raise _refuse("user assertion key is not an EC or RSA public key")
    try:
        jkt = thumbprint(jwk)
        key = jwt.PyJWK(jwk).key
    except (KeyError, ValueError, TypeError, jwt.PyJWTError):
        raise _refuse("user assertion key is not usable") from None
    if {"ES": "EC", "RS": "RSA"}.get(header["alg"][:2]) != jwk["kty"]:
        raise _refuse("user assertion alg does not fit its key")
    if jkt not in token_claims.get("client_jkt", ()):
        raise _refuse("user assertion is not signed by a key registered to this client")
    try:
        claims = jwt.decode(
            assertion,
            key=key,
            algorithms=[header["alg"]],
            audience=TOKEN_AUDIENCE,
            issuer=str(token_claims.get("client_id", "")),
            options={"require": ["iss", "sub", "aud", "iat", "exp", "jti"]},
            leeway=_LEEWAY,
        )
    except (jwt.PyJWTError, TypeError, ValueError):
        raise _refuse("user assertion not accepted") from None
    if claims["exp"] - claims["iat"] > MAX_LIFETIME_SECONDS or claims["iat"] > time.time() + _LEEWAY:
        raise _refuse("user assertion lifetime too long or issued in the future")
    role, purpose = claims.get("role"), claims.get("purpose_of_use")
    if role not in ROLES:
        raise _refuse("user assertion role is not known")
    if purpose not in PURPOSES_OF_USE:
        raise _refuse("user assertion purpose of use is not known")
    user = ActingUser(
        practitioner_id=_bounded(claims["sub"], 64),
        name=_bounded(claims.get("name", ""), 64),
        role=role,
        department=_bounded(claims.get("department", ""), 64),
        purpose_of_use=purpose,
    )
    return user, float(claims["exp"])


def _bounded(value: object, limit: int) -> str:
    text = value if isinstance(value, str) else ""
    if len(text) > limit or any(ord(ch) < 32 for ch in text):
        raise _refuse("user assertion claim malformed")
    return text
