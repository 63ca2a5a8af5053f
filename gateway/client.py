"""A member hospital's client of the exchange, as a hospital system would write it:
SMART Backend Services token request with a signed JWT assertion, then API calls.

Used by `hie demo` and by the end-to-end tests.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt

from gateway.smart import CLIENT_ASSERTION_TYPE
from services.shared.keys import PrivateKey, algorithm_for, public_jwk

# The hospital's side of the user assertion lives beside its verification (services import it too).
from services.shared.user_assertion import Practitioner, user_assertion

DEFAULT_SCOPES = "system/Patient.crs system/DocumentReference.crs system/ServiceRequest.crs system/AuditEvent.rs"


def new_traceparent(trace_id: str | None = None) -> str:
    """A W3C traceparent: version 00, trace id, a fresh parent span id, sampled."""
    return f"00-{trace_id or secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


USER_ASSERTION_HEADER = "X-HIE-User-Assertion"


class FreshUserAssertionHeaders(Mapping[str, str]):
    """Request headers that carry a newly signed user assertion each time they are read.

    The exchange takes a user assertion once (its `jti` is refused on reuse), so a client that
    sends fixed headers with every request — fhirpy's `extra_headers`, for one — hands it this
    mapping instead of a dict: every request reads it anew and gets its own assertion."""

    def __init__(
        self, *, key: PrivateKey, client_id: str, practitioner: Practitioner, purpose: str, token: str
    ) -> None:
        self._key, self._client_id, self._practitioner, self._purpose = key, client_id, practitioner, purpose
        self._fixed = {"Authorization": f"Bearer {token}"}

    def __getitem__(self, name: str) -> str:
        if name == USER_ASSERTION_HEADER:
            return user_assertion(
                key=self._key, client_id=self._client_id, practitioner=self._practitioner, purpose=self._purpose
            )
        return self._fixed[name]

    def __iter__(self) -> Iterator[str]:
        return iter([*self._fixed, USER_ASSERTION_HEADER])

    def __len__(self) -> int:
        return len(self._fixed) + 1


def client_assertion(*, key: PrivateKey, client_id: str, token_endpoint: str, lifetime: int = 240) -> str:
    now = int(time.time())
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": token_endpoint,
        "iat": now,
        "exp": now + lifetime,
        "jti": str(uuid.uuid4()),
    }
    return jwt.encode(claims, key, algorithm=algorithm_for(key), headers={"kid": public_jwk(key)["kid"]})


@dataclass
class HospitalClient:
    """One member organisation's system talking to the gateway."""

    base_url: str
    client_id: str
    key: PrivateKey
    scopes: str = DEFAULT_SCOPES
    http: httpx.AsyncClient = field(default_factory=lambda: httpx.AsyncClient(timeout=30))
    practitioner: Practitioner = field(default_factory=Practitioner)
    _token: str = ""
    _token_expires: float = 0.0

    async def token_endpoint(self) -> str:
        config = (await self.http.get(f"{self.base_url}/.well-known/smart-configuration")).json()
        return str(config["token_endpoint"])

    async def request_token(self) -> httpx.Response:
        endpoint = await self.token_endpoint()
        return await self.http.post(
            endpoint,
            data={
                "grant_type": "client_credentials",
                "scope": self.scopes,
                "client_assertion_type": CLIENT_ASSERTION_TYPE,
                "client_assertion": client_assertion(key=self.key, client_id=self.client_id, token_endpoint=endpoint),
            },
        )

    async def access_token(self) -> str:
        if not self._token or time.time() > self._token_expires - 30:
            response = await self.request_token()
            response.raise_for_status()
            body = response.json()
            self._token = body["access_token"]
            self._token_expires = time.time() + body["expires_in"]
        return self._token

    async def call(
        self,
        method: str,
        path: str,
        *,
        purpose: str = "treatment",
        traceparent: str | None = None,
        headers: dict[str, str] | None = None,
        as_user: Practitioner | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """An API call as the practitioner, for the purpose, optionally continuing a trace."""
        sent = {
            "Authorization": f"Bearer {await self.access_token()}",
            "X-HIE-User-Assertion": user_assertion(
                key=self.key,
                client_id=self.client_id,
                practitioner=as_user or self.practitioner,
                purpose=purpose,
            ),
            **(headers or {}),
        }
        if traceparent:
            sent["traceparent"] = traceparent
        return await self.http.request(method, f"{self.base_url}{path}", headers=sent, **kwargs)

    async def aclose(self) -> None:
        await self.http.aclose()
