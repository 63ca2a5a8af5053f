"""The acting person and purpose of use, asserted by the member hospital per request
(IHE IUA / XUA in spirit: the hospital vouches for its user; the exchange verifies the
hospital's signature).

A user assertion is a JWT the hospital signs with one of its registered keys:

    header   alg (ES384 / RS384 / ES256 / RS256), kid, jwk (the public key, RFC 7515 §4.1.3)
    claims   iss  the hospital's OAuth2 client id (must equal the access token's client)
             sub  the practitioner's id in the hospital
             aud  urn:hie:exchange
             iat, exp (at most five minutes apart), jti (used once per client: the gateway
                  refuses a replay)
             name, role, department, purpose_of_use (strings; role and purpose from the
                  lists below; role also within what the organisation's type may assert)

The access token lists the RFC 7638 thumbprints of the client's registered keys
(`client_jkt`), so any service can check, with no lookup, that the assertion was signed by
a key registered to the same client the token was issued to.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt

from services.shared.config import TOKEN_AUDIENCE
from services.shared.errors import Unauthenticated
from services.shared.keys import PrivateKey, algorithm_for, public_jwk, thumbprint

ACCEPTED_ALGORITHMS = ["ES384", "ES256", "RS384", "RS256"]
PURPOSES_OF_USE = frozenset(
    {"treatment", "referral", "consultation", "emergency", "research", "public-health", "audit", "operations"}
)
ROLES = frozenset({"doctor", "nurse", "pharmacist", "technician", "data-steward", "auditor", "admin"})
# Which roles an organisation may assert is the exchange's decision, by organisation type:
# member hospitals assert clinical roles and their own administrators and auditors; the platform
# operator's staff are the region's data stewards (and its own administrators and auditors); an
# authority's staff are auditors, never clinicians.
ROLES_BY_ORGANIZATION_TYPE: dict[str, frozenset[str]] = {
    "hospital": frozenset({"doctor", "nurse", "pharmacist", "technician", "auditor", "admin"}),
    "platform-admin": frozenset({"data-steward", "auditor", "admin"}),
    "authority": frozenset({"auditor"}),
}
# An assertion vouches for one request (IHE IUA: short-lived); the gateway refuses a reused jti.
MAX_LIFETIME_SECONDS = 300
_LEEWAY = 5
# The claims that are strings, with their length bound (sub must also be non-empty).
_STRING_CLAIMS = {"sub": 64, "name": 64, "role": 32, "department": 64, "purpose_of_use": 32, "jti": 256}


@dataclass(frozen=True)
class ActingUser:
    practitioner_id: str
    name: str
    role: str
    department: str
    purpose_of_use: str


def _refuse(message: str) -> Unauthenticated:
    return Unauthenticated(message, reason="user-assertion")


def _claim_refused(name: str, problem: str) -> Unauthenticated:
    return Unauthenticated(f"user assertion claim {name} {problem}", reason="user-assertion")


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
    user, expires, _ = _verify(assertion, token_claims)
    if len(_verified) >= _CACHE_SIZE:
        _verified.clear()
    _verified[key] = (expires, user)
    return user


@dataclass(frozen=True)
class VerifiedAssertion:
    """A user assertion checked now: who acts, and its jti and expiry for the replay check."""

    user: ActingUser
    jti: str
    expires: float


def check_user_assertion(assertion: str, token_claims: Mapping[str, Any]) -> VerifiedAssertion:
    """Check the assertion against the verified access token's claims, every time (no cache: the
    gateway's per-request check, where each assertion is used once); Unauthenticated otherwise.
    The jti and expiry come from the same decoding, so the replay check needs no second one."""
    user, expires, jti = _verify(assertion, token_claims)
    return VerifiedAssertion(user=user, jti=jti, expires=expires)


# Public keys built from a jwk header, by the header's exact JSON: a hospital signs every
# assertion with one of a few keys, and building the key object (PyJWK: curve point decoding and
# checks) was about 2.5 % of the gateway's samples per document query (issue 21). Only keys that
# were built are kept; the same JSON always builds the same key.
_public_keys: dict[str, Any] = {}
_PUBLIC_KEYS_SIZE = 1_000


def _public_key(jwk: dict[str, Any]) -> Any:
    text = json.dumps(jwk, sort_keys=True, separators=(",", ":"))
    key = _public_keys.get(text)
    if key is None:
        key = jwt.PyJWK(jwk).key
        if len(_public_keys) >= _PUBLIC_KEYS_SIZE:
            _public_keys.clear()
        _public_keys[text] = key
    return key


def _verify(assertion: str, token_claims: Mapping[str, Any]) -> tuple[ActingUser, float, str]:
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
        key = _public_key(jwk)
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
    for name, limit in _STRING_CLAIMS.items():
        if name in claims:
            _check_string(name, claims[name], limit)
    if not claims["sub"]:
        raise _claim_refused("sub", "is empty")
    if not isinstance(claims["exp"], int | float) or not isinstance(claims["iat"], int | float):
        raise _claim_refused("exp", "is not a number")
    if claims["exp"] - claims["iat"] > MAX_LIFETIME_SECONDS or claims["iat"] > time.time() + _LEEWAY:
        raise _refuse("user assertion lifetime too long or issued in the future")
    role, purpose = claims.get("role"), claims.get("purpose_of_use")
    if role not in ROLES:
        raise _claim_refused("role", "is not a known role")
    if purpose not in PURPOSES_OF_USE:
        raise _claim_refused("purpose_of_use", "is not a known purpose of use")
    organization_type = str(token_claims.get("org_type", ""))
    if organization_type != "platform" and role not in ROLES_BY_ORGANIZATION_TYPE.get(organization_type, ()):
        # The exchange decides who may be what: a hospital cannot make its staff data stewards,
        # an authority cannot make its staff clinicians.
        raise Unauthenticated(
            f"an organisation of type {organization_type or 'unknown'} may not assert the role {role}",
            reason="role-not-allowed",
        )
    user = ActingUser(
        practitioner_id=claims["sub"],
        name=claims.get("name", ""),
        role=role,
        department=claims.get("department", ""),
        purpose_of_use=purpose,
    )
    return user, float(claims["exp"]), str(claims["jti"])


# The gateway's statement of a user assertion it verified (the claims it vouches for), forwarded
# to services in place of the hospital's assertion: see `user_statement_claims`.
VERIFIED_USER_AUDIENCE = "urn:hie:verified-user"
STATEMENT_LIFETIME_SECONDS = MAX_LIFETIME_SECONDS


def token_hash(token: str) -> str:
    """The access token's hash as RFC 9449 writes it (`ath`): base64url SHA-256, unpadded."""
    return base64.urlsafe_b64encode(hashlib.sha256(token.encode()).digest()).rstrip(b"=").decode()


def user_statement_claims(
    user: ActingUser, *, issuer: str, token: str, token_claims: Mapping[str, Any], now: int
) -> dict[str, Any]:
    """What the gateway signs once it has verified a user assertion against the access token.

    Every service verified the hospital's own signature of the assertion again, at every hop
    (one ECDSA P-384 verification, about 1 ms of CPU on the 2-core bench machine, in the registry
    and again in consent for each document query: a new assertion per request defeats any
    cache). The gateway's statement carries the same person and purpose, bound to the access
    token (`ath`) and client, signed with the gateway's token key: each service verifies it
    against the trusted keys like the access token itself, once per statement, and the gateway
    signs one per token and user for up to five minutes, not one per request."""
    return {
        "iss": issuer,
        "aud": VERIFIED_USER_AUDIENCE,
        "sub": user.practitioner_id,
        "client_id": str(token_claims.get("client_id", "")),
        "ath": token_hash(token),
        "iat": now,
        "exp": min(now + STATEMENT_LIFETIME_SECONDS, int(token_claims.get("exp", now + STATEMENT_LIFETIME_SECONDS))),
        "jti": str(uuid.uuid4()),
        "name": user.name,
        "role": user.role,
        "department": user.department,
        "purpose_of_use": user.purpose_of_use,
    }


def user_from_statement(
    statement_claims: Mapping[str, Any], *, token: str, token_claims: Mapping[str, Any]
) -> ActingUser:
    """The acting user a verified gateway statement vouches for, if it was issued for this access
    token and client; Unauthenticated otherwise. The role is held to the organisation type again."""
    if statement_claims.get("ath") != token_hash(token) or statement_claims.get("client_id") != token_claims.get(
        "client_id"
    ):
        raise _refuse("the verified user statement was issued for another access token")
    for name, limit in _STRING_CLAIMS.items():
        if name in statement_claims:
            _check_string(name, statement_claims[name], limit)
    role, purpose = statement_claims.get("role"), statement_claims.get("purpose_of_use")
    organization_type = str(token_claims.get("org_type", ""))
    if role not in ROLES or purpose not in PURPOSES_OF_USE or not statement_claims.get("sub"):
        raise _refuse("verified user statement not accepted")
    if organization_type != "platform" and role not in ROLES_BY_ORGANIZATION_TYPE.get(organization_type, ()):
        raise Unauthenticated(
            f"an organisation of type {organization_type or 'unknown'} may not assert the role {role}",
            reason="role-not-allowed",
        )
    return ActingUser(
        practitioner_id=str(statement_claims["sub"]),
        name=str(statement_claims.get("name", "")),
        role=str(role),
        department=str(statement_claims.get("department", "")),
        purpose_of_use=str(purpose),
    )


def _check_string(name: str, value: object, limit: int) -> None:
    if not isinstance(value, str):
        raise _claim_refused(name, "must be a string")
    if len(value) > limit or any(ord(ch) < 32 for ch in value):
        raise _claim_refused(name, f"must be at most {limit} printable characters")


@dataclass(frozen=True)
class Practitioner:
    """The person acting through the hospital's system."""

    id: str = "D0001"
    name: str = "值班医生"
    role: str = "doctor"
    department: str = "急诊科"


def user_assertion(
    *, key: PrivateKey, client_id: str, practitioner: Practitioner, purpose: str, lifetime: int = 300
) -> str:
    """The hospital's signed statement of who acts and why (the claims above); what a hospital
    system signs per request (gateway/client.py), and the benchmarks and tests as hospitals."""
    now = int(time.time())
    jwk = public_jwk(key)
    claims = {
        "iss": client_id,
        "sub": practitioner.id,
        "aud": TOKEN_AUDIENCE,
        "iat": now,
        "exp": now + lifetime,
        "jti": str(uuid.uuid4()),
        "name": practitioner.name,
        "role": practitioner.role,
        "department": practitioner.department,
        "purpose_of_use": purpose,
    }
    public = {k: jwk[k] for k in ("kty", "crv", "x", "y", "n", "e") if k in jwk}
    return jwt.encode(claims, key, algorithm=algorithm_for(key), headers={"kid": jwk["kid"], "jwk": public})
