"""The console session's idle timeout over plain HTTP: a session with no request for longer than
the timeout (15 minutes by default, HIE_CONSOLE_IDLE_MINUTES) is over — the next request goes to
sign-in, the session row is gone and its refresh token revoked — while a session in use stays."""

from __future__ import annotations

import datetime
import re
import secrets

import httpx
import pytest
import sqlalchemy as sa

from gateway.console import store
from gateway.console.admin import add_console_user, gateway_transaction
from gateway.console.state import DEFAULT_IDLE_TIMEOUT, idle_timeout_from
from services.shared.db import utcnow
from tests.conftest import Exchange

PASSWORD = "一个足够长的密码-2026"


async def _signed_in(http: httpx.AsyncClient, exchange: Exchange) -> str:
    hospital = await exchange.member(name="市第六人民医院")
    org = hospital.org_id  # type: ignore[attr-defined]
    username = f"doc{secrets.token_hex(3)}"
    await add_console_user(
        exchange.settings, org_id=org, username=username, display_name="上官医生", role="doctor", password=PASSWORD
    )
    form = await http.get(f"{exchange.base_url}/console/login")
    assert form.status_code == 200, form.text
    fields = dict(re.findall(r'name="([a-z_]+)" value="([^"]*)"', form.text))
    fields.pop("method", None)  # the password button, not the provider one
    fields.update({"org": org, "username": username, "password": PASSWORD})
    landed = await http.post(f"{exchange.base_url}/oauth2/authorize", data=fields)
    assert landed.url.path == "/console/clinician", landed.text
    return http.cookies["hie_console"]


async def _idle_for(exchange: Exchange, sid: str, minutes: float) -> None:
    async with gateway_transaction(exchange.settings) as session:
        await session.execute(
            sa.update(store.ConsoleSession)
            .where(store.ConsoleSession.id_hash == store.digest(sid))
            .values(last_seen_at=utcnow() - datetime.timedelta(minutes=minutes))
        )


async def _session_row(exchange: Exchange, sid: str) -> store.ConsoleSession | None:
    async with gateway_transaction(exchange.settings) as session:
        return await session.get(store.ConsoleSession, store.digest(sid))


async def test_an_idle_session_ends_and_an_active_one_stays(exchange: Exchange) -> None:
    async with httpx.AsyncClient(follow_redirects=True) as http:
        sid = await _signed_in(http, exchange)
        page = f"{exchange.base_url}/console/clinician"

        # Used 14 minutes ago: still signed in, and the request counts as activity.
        await _idle_for(exchange, sid, 14)
        answer = await http.get(page, follow_redirects=False)
        assert answer.status_code == 200
        row = await _session_row(exchange, sid)
        assert row is not None
        assert utcnow() - row.last_seen_at < datetime.timedelta(minutes=1)

        # Nothing for 16 minutes: the next request goes to sign-in, and the session is over for good.
        await _idle_for(exchange, sid, 16)
        refresh_hash = store.digest(row.refresh_token)
        answer = await http.get(page, follow_redirects=False)
        assert answer.status_code == 303
        assert answer.headers["location"] == "/console/login"
        assert await _session_row(exchange, sid) is None
        async with gateway_transaction(exchange.settings) as session:
            refresh = await session.get(store.RefreshToken, refresh_hash)
        assert refresh is not None
        assert refresh.revoked
        # The old cookie, sent again, does not bring it back.
        http.cookies.set("hie_console", sid, path="/console")
        assert (await http.get(page, follow_redirects=False)).status_code == 303


def test_the_idle_timeout_is_configurable_and_checked() -> None:
    assert idle_timeout_from({}) == DEFAULT_IDLE_TIMEOUT == datetime.timedelta(minutes=15)
    assert idle_timeout_from({"HIE_CONSOLE_IDLE_MINUTES": "5"}) == datetime.timedelta(minutes=5)
    for bad in ("0", "481", "soon"):
        with pytest.raises(ValueError, match="HIE_CONSOLE_IDLE_MINUTES"):
            idle_timeout_from({"HIE_CONSOLE_IDLE_MINUTES": bad})
