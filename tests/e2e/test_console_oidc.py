"""Signing in to the console through an organisation's own OpenID Connect provider: a small
real provider (discovery, authorize, token with PKCE and a client secret, JWKS, ES256 ID
tokens) runs on a loopback port; the person must exist in the organisation, and the
provider's `sub` is bound at the first sign-in."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import jwt
import pytest
import sqlalchemy as sa
import uvicorn
from cryptography.hazmat.primitives.asymmetric import ec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from typer.testing import CliRunner

from gateway.console import store
from services.ops import cli
from services.ops.cli_users import add_console_user, gateway_transaction
from services.shared.keys import public_jwk
from tests.conftest import Exchange, _loopback_socket

CLIENT_ID = "hie-exchange"
CLIENT_SECRET = secrets.token_urlsafe(16)


@dataclass
class Provider:
    """A minimal OpenID provider: it signs in whoever `next_user` names, without asking."""

    issuer: str = ""
    next_user: tuple[str, str] = ("", "")  # (sub, preferred_username)
    key: Any = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    codes: dict[str, dict[str, str]] = field(default_factory=dict)

    def app(self) -> Starlette:
        async def configuration(request: Request) -> Response:
            return JSONResponse(
                {
                    "issuer": self.issuer,
                    "authorization_endpoint": f"{self.issuer}/authorize",
                    "token_endpoint": f"{self.issuer}/token",
                    "jwks_uri": f"{self.issuer}/jwks",
                    "id_token_signing_alg_values_supported": ["ES256"],
                }
            )

        async def authorize(request: Request) -> Response:
            q = request.query_params
            code = secrets.token_urlsafe(16)
            self.codes[code] = {
                "nonce": q["nonce"],
                "challenge": q["code_challenge"],
                "redirect_uri": q["redirect_uri"],
                "client_id": q["client_id"],
            }
            return RedirectResponse(f"{q['redirect_uri']}?{urlencode({'code': code, 'state': q['state']})}", 302)

        async def token(request: Request) -> Response:
            form = await request.form()
            grant = self.codes.pop(str(form.get("code")), None)
            verifier = str(form.get("code_verifier", ""))
            challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
            if (
                grant is None
                or form.get("client_secret") != CLIENT_SECRET
                or challenge != grant["challenge"]
                or form.get("redirect_uri") != grant["redirect_uri"]
            ):
                return JSONResponse({"error": "invalid_grant"}, status_code=400)
            now = int(time.time())
            sub, username = self.next_user
            id_token = jwt.encode(
                {
                    "iss": self.issuer,
                    "sub": sub,
                    "aud": grant["client_id"],
                    "iat": now,
                    "exp": now + 300,
                    "nonce": grant["nonce"],
                    "preferred_username": username,
                },
                self.key,
                algorithm="ES256",
                headers={"kid": "k1"},
            )
            return JSONResponse({"access_token": "x", "token_type": "Bearer", "id_token": id_token})

        async def keys(request: Request) -> Response:
            return JSONResponse({"keys": [{**public_jwk(self.key), "kid": "k1", "alg": "ES256"}]})

        return Starlette(
            routes=[
                Route("/.well-known/openid-configuration", configuration),
                Route("/authorize", authorize),
                Route("/token", token, methods=["POST"]),
                Route("/jwks", keys),
            ]
        )


@pytest.fixture
async def provider() -> AsyncIterator[Provider]:
    running = Provider()
    sock = _loopback_socket()
    running.issuer = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(running.app(), log_level="warning"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield running
    finally:
        server.should_exit = True
        await task


async def _sign_in(http: httpx.AsyncClient, base: str, org: str) -> httpx.Response:
    form = await http.get(f"{base}/console/login")
    assert form.status_code == 200, form.text
    fields = dict(re.findall(r'name="([a-z_]+)" value="([^"]*)"', form.text))
    fields.update({"org": org, "method": "oidc"})
    return await http.post(f"{base}/oauth2/authorize", data=fields)


async def test_sign_in_through_the_organisations_provider(exchange: Exchange, provider: Provider) -> None:
    hospital = await exchange.member(name="市第三人民医院")
    org = hospital.org_id  # type: ignore[attr-defined]
    username = f"doc{secrets.token_hex(3)}"
    await add_console_user(
        exchange.settings, org_id=org, username=username, display_name="周医生", role="doctor", password=None
    )
    async with gateway_transaction(exchange.settings) as session:
        session.add(
            store.OidcProvider(org_id=org, issuer=provider.issuer, client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
        )

    async with httpx.AsyncClient(follow_redirects=True) as http:
        provider.next_user = ("upstream-sub-1", username)
        landed = await _sign_in(http, exchange.base_url, org)
        assert landed.status_code == 200, landed.text
        assert landed.url.path == "/console/clinician"
        assert "周医生" in landed.text

    async with httpx.AsyncClient(follow_redirects=True) as http:
        # The same username from a different provider account: refused (sub bound at first use).
        provider.next_user = ("upstream-sub-2", username)
        refused = await _sign_in(http, exchange.base_url, org)
        assert refused.status_code == 401
        assert "hie_console" not in http.cookies

    async with httpx.AsyncClient(follow_redirects=True) as http:
        # A provider account with no console user in the organisation: refused.
        provider.next_user = ("upstream-sub-3", "nobody-here")
        assert (await _sign_in(http, exchange.base_url, org)).status_code == 401


async def test_organisation_without_a_provider_gets_a_clear_answer(exchange: Exchange) -> None:
    hospital = await exchange.member(name="市第四人民医院")
    async with httpx.AsyncClient(follow_redirects=True) as http:
        answer = await _sign_in(http, exchange.base_url, hospital.org_id)  # type: ignore[attr-defined]
    assert answer.status_code == 400
    assert "未配置统一身份认证" in answer.text


async def test_client_secret_is_stored_encrypted_and_still_signs_in(
    exchange: Exchange, provider: Provider, tmp_path: Path
) -> None:
    """`hie user oidc --client-secret-file` keeps the provider's client secret encrypted with the
    exchange's data keys: the stored bytes hold no copy of it, and sign-in still presents it."""
    hospital = await exchange.member(name="市第五人民医院")
    org = hospital.org_id  # type: ignore[attr-defined]
    username = f"doc{secrets.token_hex(3)}"
    await add_console_user(
        exchange.settings, org_id=org, username=username, display_name="欧阳医生", role="doctor", password=None
    )
    secret_file = tmp_path / "client-secret"
    secret_file.write_text(CLIENT_SECRET + "\n", encoding="utf-8")
    settings = exchange.settings
    # The operator's command, as typed (its own event loop: in a thread beside the running exchange).
    result = await asyncio.to_thread(
        CliRunner().invoke,
        cli.app,
        [
            "user",
            "oidc",
            "--org",
            org,
            "--issuer",
            provider.issuer,
            "--client-id",
            CLIENT_ID,
            "--client-secret-file",
            str(secret_file),
            "--data-dir",
            str(settings.data_dir),
            "--database-url",
            settings.database_url or "",
        ],
        env={"HIE_DB_SCHEMA_PREFIX": settings.schema_prefix, "HIE_DATA_KEYS_FILE": str(settings.data_keys_file)},
    )
    assert result.exit_code == 0, result.output
    assert CLIENT_SECRET not in result.output

    async with gateway_transaction(settings) as session:
        stored = (
            await session.execute(
                sa.text("SELECT client_secret FROM console_oidc_provider WHERE org_id = :org"), {"org": org}
            )
        ).scalar_one()
    raw = stored.encode() if isinstance(stored, str) else bytes(stored)
    assert raw
    assert CLIENT_SECRET.encode() not in raw
    assert base64.urlsafe_b64encode(CLIENT_SECRET.encode()).rstrip(b"=") not in raw

    async with httpx.AsyncClient(follow_redirects=True) as http:
        provider.next_user = ("upstream-sub-9", username)
        landed = await _sign_in(http, exchange.base_url, org)
        # The provider's token endpoint checked the secret: it was decrypted for the request.
        assert landed.status_code == 200, landed.text
        assert landed.url.path == "/console/clinician"
