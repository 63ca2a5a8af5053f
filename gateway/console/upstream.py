"""Signing in through an organisation's own OpenID Connect provider (optional, per
organisation; OpenID Connect Core 1.0 authorization code flow, with PKCE S256 and a nonce).

The provider only proves who the person is: the person must already be a console user of that
organisation (matched by the configured claim, `preferred_username` by default), and their role
and department come from the exchange's user record, never from the provider. The provider's
`sub` is bound to the user at the first sign-in; a different `sub` later is refused.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
import jwt

from gateway.console import store

UPSTREAM_CALLBACK_PATH = "/oauth2/upstream/callback"
# OpenID Connect Core §3.1.3.7: the ID token's signature algorithms accepted from a provider.
ID_TOKEN_ALGORITHMS = ["RS256", "ES256", "ES384", "RS384", "PS256"]
_TIMEOUT = 10.0
_LEEWAY = 30


class UpstreamRefused(Exception):
    """The provider's answer cannot sign anyone in (the message names no person)."""


@dataclass(frozen=True)
class UpstreamStart:
    location: str
    state: str
    verifier: str
    nonce: str


def allowed_issuer(issuer: str) -> bool:
    """https, or http on a loopback address (development and tests)."""
    parts = urlsplit(issuer)
    if parts.scheme == "https":
        return True
    try:
        return parts.scheme == "http" and ipaddress.ip_address(parts.hostname or "").is_loopback
    except ValueError:
        return parts.hostname == "localhost"


async def discover(issuer: str) -> dict[str, Any]:
    """The provider's metadata (OpenID Connect Discovery 1.0 §4), its issuer checked (§4.3)."""
    if not allowed_issuer(issuer):
        raise UpstreamRefused("the provider's issuer must be https")
    async with httpx.AsyncClient(timeout=_TIMEOUT) as http:
        response = await http.get(issuer.rstrip("/") + "/.well-known/openid-configuration")
    if response.status_code != 200:
        raise UpstreamRefused("the provider's configuration could not be read")
    metadata = response.json()
    # "The issuer value returned MUST be identical to the Issuer URL that was used as the prefix
    # to /.well-known/openid-configuration to retrieve the configuration information."
    if metadata.get("issuer") != issuer:
        raise UpstreamRefused("the provider's issuer does not match its configuration")
    return dict(metadata)


async def start(provider: store.OidcProvider, *, redirect_uri: str) -> UpstreamStart:
    metadata = await discover(provider.issuer)
    state, nonce, verifier = secrets.token_urlsafe(32), secrets.token_urlsafe(32), secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    query = {
        "response_type": "code",
        "client_id": provider.client_id,
        "redirect_uri": redirect_uri,
        "scope": "openid profile",
        "state": state,
        "nonce": nonce,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    return UpstreamStart(f"{metadata['authorization_endpoint']}?{urlencode(query)}", state, verifier, nonce)


async def finish(
    provider: store.OidcProvider, *, client_secret: str, code: str, verifier: str, nonce: str, redirect_uri: str
) -> dict[str, Any]:
    """Exchange the provider's code and return the verified ID token's claims."""
    metadata = await discover(provider.issuer)
    async with httpx.AsyncClient(timeout=_TIMEOUT) as http:
        response = await http.post(
            metadata["token_endpoint"],
            data={
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": redirect_uri,
                "client_id": provider.client_id,
                "client_secret": client_secret,
                "code_verifier": verifier,
            },
        )
        if response.status_code != 200 or "id_token" not in response.json():
            raise UpstreamRefused("the provider did not issue an ID token")
        jwks = await http.get(metadata["jwks_uri"])
    id_token = response.json()["id_token"]
    try:
        header = jwt.get_unverified_header(id_token)
        if header.get("alg") not in ID_TOKEN_ALGORITHMS:
            raise UpstreamRefused("the ID token's algorithm is not accepted")
        keys = jwt.PyJWKSet.from_dict(jwks.json())
        candidates = [k for k in keys.keys if not header.get("kid") or k.key_id == header.get("kid")]
        if not candidates:
            raise UpstreamRefused("no provider key matches the ID token")
        claims = jwt.decode(
            id_token,
            key=candidates[0].key,
            algorithms=[header["alg"]],
            audience=provider.client_id,
            issuer=provider.issuer,
            options={"require": ["iss", "sub", "aud", "exp", "iat"]},
            leeway=_LEEWAY,
        )
    except (jwt.PyJWTError, ValueError, KeyError, TypeError):
        raise UpstreamRefused("the ID token does not verify") from None
    # OpenID Connect Core §3.1.3.7 (11): "the Client MUST check that a nonce Claim Value is
    # present and its value checked to verify that it is the same value as the one that was sent".
    if not secrets.compare_digest(str(claims.get("nonce", "")), nonce):
        raise UpstreamRefused("the ID token's nonce does not match")
    if claims["iat"] > time.time() + _LEEWAY:
        raise UpstreamRefused("the ID token is issued in the future")
    return dict(claims)
