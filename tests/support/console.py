"""The console's browser tests share these: Debian's chromium through Playwright, signing in,
screenshots kept as artefacts, the axe accessibility check and console users."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.ops.cli_users import add_console_user
from tests.conftest import Exchange

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "console"
AXE = Path(__file__).resolve().parents[1] / "support" / "axe" / "axe.min.js"
PASSWORD = "正确的马电池订书钉-42"

playwright_api = pytest.importorskip("playwright.async_api", reason="playwright is in the test extras")


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as p:
        launched = await p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def page(browser: Any) -> AsyncIterator[Any]:
    context = await browser.new_context(locale="zh-CN")
    opened = await context.new_page()
    opened.csp_violations = []  # type: ignore[attr-defined]
    opened.on(
        "console",
        lambda message: (
            opened.csp_violations.append(message.text)  # type: ignore[attr-defined]
            if "Content Security Policy" in message.text
            else None
        ),
    )
    try:
        yield opened
    finally:
        await context.close()


async def sign_in(page: Any, base_url: str, org: str, username: str, password: str) -> None:
    await page.goto(f"{base_url}/console/login")
    await page.get_by_label("机构代码").fill(org)
    await page.get_by_label("用户名").fill(username)
    await page.get_by_label("密码").fill(password)
    await page.get_by_role("button", name="登录", exact=True).click()
    await page.wait_for_load_state()


async def screenshot(page: Any, name: str, backend: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}-{backend}.png"), full_page=True)


async def check_accessibility(page: Any) -> None:
    """axe-core on the current page: no serious or critical violation (forms labelled, etc.)."""
    # Injected through the DevTools protocol (page.evaluate), which the page's CSP does not
    # govern: a <script> tag would be refused, as it should be.
    await page.evaluate(AXE.read_text(encoding="utf-8") + "\n;true")
    result = await page.evaluate(
        "async () => await axe.run(document, {runOnly: ['wcag2a', 'wcag2aa', 'best-practice']})"
    )
    bad = [
        (v["id"], [n["target"] for n in v["nodes"]][:3])
        for v in result["violations"]
        if v["impact"] in {"serious", "critical"}
    ]
    assert bad == [], json.dumps(bad, ensure_ascii=False)


async def _user(exchange: Exchange, org: str, role: str, name: str, department: str = "") -> str:
    username = f"{role[:4]}{secrets.token_hex(3)}"
    await add_console_user(
        exchange.settings,
        org_id=org,
        username=username,
        display_name=name,
        role=role,
        department=department,
        password=PASSWORD,
    )
    return username
