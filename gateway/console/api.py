"""The console calls the exchange's public HTTP API, as a hospital system does: same routes,
same bearer token rules, same user assertion, same consent and audit (no back door). The calls
go in process (httpx's ASGI transport into the same application), carrying the browser's
address so the audit log records where the person sat."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import Request

from gateway.client import Practitioner, new_traceparent
from gateway.console import store
from gateway.console.authorization import CONSOLE_CLIENT_ID
from gateway.console.state import console_state
from gateway.deps import USER_ASSERTION_HEADER
from services.shared.db import utcnow
from services.shared.tracing import current_trace_ids

_REFRESH_MARGIN = datetime.timedelta(seconds=30)


class SignInRequired(Exception):
    """No live console session (or it could not be renewed): sign in again."""


@dataclass
class ApiResult:
    status: int
    body: Any
    headers: httpx.Headers
    content: bytes

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def error(self) -> dict[str, str]:
        """The API's machine-readable error ({status, reason, message})."""
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), dict):
            return self.body["error"]
        return {"status": str(self.status), "reason": "http", "message": ""}


def _client(request: Request) -> httpx.AsyncClient:
    address = request.client.host if request.client else "127.0.0.1"
    transport = httpx.ASGITransport(app=request.app, client=(address, 0))
    return httpx.AsyncClient(transport=transport, base_url=request.app.state.settings.public_url, timeout=60)


async def exchange_code(request: Request, *, code: str, verifier: str) -> ApiResult:
    """The console's code exchange at the gateway's token endpoint (RFC 6749 §4.1.3)."""
    state = console_state(request.app)
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": state.authorization.client.redirect_uri,
        "client_id": CONSOLE_CLIENT_ID,
        "code_verifier": verifier,
    }
    async with _client(request) as http:
        response = await http.post("/oauth2/token", data=form)
    return ApiResult(response.status_code, response.json(), response.headers, b"")


class ConsoleApi:
    """API calls for one signed-in person."""

    def __init__(
        self, request: Request, session_row: store.ConsoleSession, user: store.ConsoleUser, *, org_client_id: str
    ) -> None:
        self._request = request
        self._session = session_row
        self._user = user
        self._org_client_id = org_client_id

    async def _token(self, http: httpx.AsyncClient) -> str:
        if self._session.access_expires_at - _REFRESH_MARGIN > utcnow():
            return self._session.access_token
        response = await http.post(
            "/oauth2/token",
            data={
                "grant_type": "refresh_token",
                "refresh_token": self._session.refresh_token,
                "client_id": CONSOLE_CLIENT_ID,
            },
        )
        async with self._request.app.state.sessions() as db, db.begin():
            row = await db.get(store.ConsoleSession, self._session.id_hash)
            if row is None:
                raise SignInRequired
            if response.status_code != 200:
                # Another request of the same session (a second tab) renewed first and spent
                # the refresh token: use what it stored.
                if row.access_expires_at - _REFRESH_MARGIN > utcnow():
                    self._session = row
                    return row.access_token
                raise SignInRequired
            body = response.json()
            row.access_token = body["access_token"]
            row.refresh_token = body.get("refresh_token", row.refresh_token)
            row.access_expires_at = utcnow() + datetime.timedelta(seconds=int(body["expires_in"]))
            self._session = row
        return self._session.access_token

    async def call(
        self, method: str, path: str, *, idempotency_key: str = "", purpose: str = "", **kwargs: Any
    ) -> ApiResult:
        """One API call as the person; `purpose` names the purpose of use of a screen that acts
        for one (a referral, a consultation), else the one chosen in the header applies."""
        state = console_state(self._request.app)
        async with _client(self._request) as http:
            token = await self._token(http)
            assertion = state.signer.sign(
                client_id=self._org_client_id,
                practitioner=Practitioner(
                    id=self._user.username,
                    name=self._user.display_name,
                    role=self._user.role,
                    department=self._user.department,
                ),
                purpose=purpose or self._session.purpose_of_use,
            )
            trace_id, _ = current_trace_ids()
            headers = {
                "Authorization": f"Bearer {token}",
                USER_ASSERTION_HEADER: assertion,
                # The page and the API calls it makes are one trace.
                "traceparent": new_traceparent(trace_id or None),
            }
            if idempotency_key:
                # A confirmation submitted twice (double click, resent form) is one change.
                headers["Idempotency-Key"] = idempotency_key
            response = await http.request(method, path, headers=headers, **kwargs)
        body: Any = None
        if response.headers.get("content-type", "").startswith("application/json"):
            body = response.json()
        return ApiResult(response.status_code, body, response.headers, response.content)

    async def get(self, path: str, params: dict[str, Any] | None = None, *, purpose: str = "") -> ApiResult:
        return await self.call(
            "GET", path, params={k: v for k, v in (params or {}).items() if v not in ("", None)}, purpose=purpose
        )

    async def post(self, path: str, json: Any = None, *, idempotency_key: str = "", purpose: str = "") -> ApiResult:
        return await self.call("POST", path, json=json, idempotency_key=idempotency_key, purpose=purpose)

    async def delete(self, path: str) -> ApiResult:
        return await self.call("DELETE", path)
