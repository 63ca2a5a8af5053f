"""The console's authorization server over plain HTTP (RFC 6749 §4.1, RFC 7636, §6): PKCE is
required, a code is used once, a wrong verifier is refused, refresh tokens rotate, and a
disabled person's refresh token stops working."""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from urllib.parse import parse_qs, urlsplit

import httpx

from gateway.console import users
from gateway.console.authorization import ALL_SCOPES, CONSOLE_CLIENT_ID
from services.ops.cli_users import add_console_user, gateway_transaction
from tests.conftest import Exchange

PASSWORD = "一个足够长的密码-2026"


def _pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    return verifier, base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


async def _code(http: httpx.AsyncClient, base: str, org: str, username: str, challenge: str | None) -> httpx.Response:
    params = {
        "response_type": "code",
        "client_id": CONSOLE_CLIENT_ID,
        "redirect_uri": f"{base}/console/callback",
        "scope": ALL_SCOPES,
        "state": "s1",
    }
    if challenge:
        params |= {"code_challenge": challenge, "code_challenge_method": "S256"}
    form = await http.get(f"{base}/oauth2/authorize", params=params)
    if form.status_code != 200:
        return form
    csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert csrf is not None
    return await http.post(
        f"{base}/oauth2/authorize",
        data={**params, "csrf": csrf.group(1), "org": org, "username": username, "password": PASSWORD},
    )


async def test_code_pkce_and_refresh_rotation(exchange: Exchange) -> None:
    hospital = await exchange.member(name="市第二人民医院")
    org = hospital.org_id  # type: ignore[attr-defined]
    username = f"doc{secrets.token_hex(3)}"
    await add_console_user(
        exchange.settings, org_id=org, username=username, display_name="孙医生", role="doctor", password=PASSWORD
    )
    base = exchange.base_url
    async with httpx.AsyncClient() as http:
        # No PKCE challenge: refused before any sign-in form is shown.
        assert (await _code(http, base, org, username, None)).status_code == 400

        verifier, challenge = _pkce()
        answer = await _code(http, base, org, username, challenge)
        assert answer.status_code == 303, answer.text
        code = parse_qs(urlsplit(answer.headers["location"]).query)["code"][0]
        token_form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": f"{base}/console/callback",
            "client_id": CONSOLE_CLIENT_ID,
        }
        wrong = await http.post(f"{base}/oauth2/token", data={**token_form, "code_verifier": _pkce()[0]})
        assert wrong.status_code == 400
        assert wrong.json()["error"] == "invalid_grant"
        issued = await http.post(f"{base}/oauth2/token", data={**token_form, "code_verifier": verifier})
        assert issued.status_code == 200, issued.text
        body = issued.json()
        assert set(body["scope"].split()) <= set(ALL_SCOPES.split())
        # The code is single use.
        replay = await http.post(f"{base}/oauth2/token", data={**token_form, "code_verifier": verifier})
        assert replay.status_code == 400

        refresh = {"grant_type": "refresh_token", "client_id": CONSOLE_CLIENT_ID}
        renewed = await http.post(f"{base}/oauth2/token", data={**refresh, "refresh_token": body["refresh_token"]})
        assert renewed.status_code == 200, renewed.text
        assert renewed.json()["refresh_token"] != body["refresh_token"]
        # Rotation: the old refresh token is spent.
        again = await http.post(f"{base}/oauth2/token", data={**refresh, "refresh_token": body["refresh_token"]})
        assert again.status_code == 400

        async with gateway_transaction(exchange.settings) as session:
            await users.set_status(session, org_id=org, username=username, status="disabled")
        after = await http.post(
            f"{base}/oauth2/token", data={**refresh, "refresh_token": renewed.json()["refresh_token"]}
        )
        assert after.status_code == 400
