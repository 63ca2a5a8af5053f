"""The web console in a real headless Chromium (Playwright, Debian's /usr/bin/chromium) against
the running exchange: people sign in with authorization code + PKCE, and every screen works
through the exchange's public API. Screenshots go to test-artifacts/console/ (gitignored)."""

from __future__ import annotations

import re
import secrets
from typing import Any

import pytest

from gateway.client import new_traceparent
from services.ops.demo import discharge_summary_cda
from tests.conftest import Exchange
from tests.support import console
from tests.support.console import (
    CHROMIUM,
    PASSWORD,
    check_accessibility,
    screenshot,
    sign_in,
)
from tests.support.console import _user as _user
from tests.support.factories import document, person

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)"
    ),
]

# The browser and a fresh page per test (module-scoped browser, as the fixtures say).
browser = console.browser
page = console.page


async def _hospitals(exchange: Exchange) -> tuple[Any, Any]:
    a = await exchange.member(name="市第一人民医院")
    b = await exchange.member(name="城东社区卫生服务中心")
    return a, b


async def _platform_operator(exchange: Exchange) -> Any:
    """The platform operator, whose staff are the region's data stewards."""
    return await exchange.member(type="platform-admin", scopes="system/Patient.rus", name="平台运营")


async def _find_task(page: Any, born: str) -> Any:
    """The review task of the pair born on that day, paging through the region's queue."""
    while True:
        task = page.locator("section.task", has_text=born)
        if await task.count() == 1:
            return task
        following = page.locator("#next-page")
        assert await following.count() == 1, "the task is not in the queue"
        await following.click()
        await page.wait_for_load_state()


async def _shared_document(exchange: Exchange, a: Any, b: Any, trace_id: str) -> dict[str, Any]:
    """张三 at both hospitals (B registered him at his first visit there, with the national id from
    his card: its care relationship); A registers a discharge summary and B reads it, in one trace."""
    patient = person(
        "张三",
        family="张",
        given="三",
        phones=["13800138000"],
        address={"province": "北京市", "district": "西城区", "line": "金融街 1 号"},
    )
    assert (await a.call("POST", "/api/v1/patients", json={"local_id": "A-1", **patient})).status_code == 201
    assert (await b.call("POST", "/api/v1/patients", json={"local_id": "B-1", **patient})).status_code == 201
    registered = await a.call(
        "POST",
        "/api/v1/documents",
        json=document("A-1", discharge_summary_cda("张三")),
        traceparent=new_traceparent(trace_id),
    )
    assert registered.status_code == 201, registered.text
    document_id = registered.json()["document_id"]
    read = await b.call("GET", f"/api/v1/documents/{document_id}/content", traceparent=new_traceparent(trace_id))
    assert read.status_code == 200
    await exchange.audit_settled()
    return patient


async def test_auditor_follows_a_trace_across_two_hospitals(exchange: Exchange, page: Any) -> None:
    a, b = await _hospitals(exchange)
    authority = await exchange.member(type="authority", name="市卫健委")
    trace_id = secrets.token_hex(16)
    await _shared_document(exchange, a, b, trace_id)
    auditor = await _user(exchange, authority.org_id, "auditor", "陈审计", "医政医管处")  # type: ignore[attr-defined]

    await sign_in(page, exchange.base_url, authority.org_id, auditor, PASSWORD)  # type: ignore[attr-defined]
    assert page.url.endswith("/console/audit")
    await page.get_by_label("追踪号").fill(trace_id)
    await page.get_by_role("button", name="查询").click()
    rows = page.locator("table.events tbody tr")
    assert await rows.count() >= 2
    await check_accessibility(page)
    await screenshot(page, "auditor-search", exchange.backend)

    await rows.first.get_by_role("link").click()
    await page.wait_for_url(re.compile(f"/console/audit/trace/{trace_id}"))
    lanes = {await item.get_attribute("data-org") for item in await page.locator("ol.timeline li").all()}
    assert {a.org_id, b.org_id} <= lanes  # type: ignore[attr-defined]
    assert await page.locator("ol.timeline li[aria-current=true]").count() == 1
    await screenshot(page, "auditor-timeline", exchange.backend)

    # The console's own calls are audited, naming the person.
    await exchange.audit_settled()
    await page.goto(f"{exchange.base_url}/console/audit?practitioner_id={auditor}&all=1")
    assert await page.locator("table.events tbody tr").count() >= 1
    assert "陈审计" in await page.locator("table.events").inner_text()

    await page.goto(f"{exchange.base_url}/console/audit/overview")
    assert "完整" in await page.locator("#chain-status").inner_text()
    # One page, five API calls: each went with its own user assertion (the gateway takes a jti once).
    assert await page.locator("div.error").count() == 0
    assert await page.locator("#checkpoint").count() == 1
    assert await page.locator("svg.chart").count() >= 1
    await screenshot(page, "auditor-overview", exchange.backend)

    export = await page.request.get(f"{exchange.base_url}/console/audit/export.csv?trace_id={trace_id}")
    assert export.status == 200
    assert (await export.text()).splitlines()[0].startswith("event_id,")

    await page.goto(
        f"{exchange.base_url}/console/audit/patient-access?patient_domain={a.org_id}&patient_local_id=A-1"  # type: ignore[attr-defined]
    )
    assert await page.locator("table.events tbody tr").count() >= 1
    await check_accessibility(page)
    await screenshot(page, "auditor-patient-access", exchange.backend)

    # Beside it, the authority's report of registrations followed by cross-domain reads: B
    # registered 张三 and then read A's document about him.
    await page.get_by_role("link", name="登记后跨机构调阅").click()
    row = await page.locator(f"table.registrations tr[data-org='{b.org_id}']").inner_text()  # type: ignore[attr-defined]
    assert int(row.split()[2]) >= 1  # cross-domain reads
    await check_accessibility(page)
    await screenshot(page, "auditor-registrations", exchange.backend)
    assert page.csp_violations == []  # type: ignore[attr-defined]


async def test_steward_resolves_a_review_task(exchange: Exchange, page: Any) -> None:
    a, b = await _hospitals(exchange)
    born = f"{1940 + secrets.randbelow(60)}-{1 + secrets.randbelow(12):02d}-{1 + secrets.randbelow(28):02d}"
    local = f"RV-{secrets.token_hex(3)}"
    common = {"name": "王芳", "gender": "female", "birth_date": born}
    await a.call("POST", "/api/v1/patients", json={"local_id": local, **common, "phones": ["13811110001"]})
    await b.call("POST", "/api/v1/patients", json={"local_id": local, **common, "phones": ["13922220002"]})
    # The region's data stewards are the platform operator's staff (a hospital cannot have one).
    ops = await _platform_operator(exchange)
    steward = await _user(exchange, ops.org_id, "data-steward", "吴管理", "主索引管理组")  # type: ignore[attr-defined]

    await sign_in(page, exchange.base_url, ops.org_id, steward, PASSWORD)  # type: ignore[attr-defined]
    assert page.url.endswith("/console/steward")
    # The whole region's queue, oldest first: page to this pair's task.
    task = await _find_task(page, born)
    assert "王芳" in await task.inner_text()
    await check_accessibility(page)
    await screenshot(page, "steward-queue", exchange.backend)
    await task.get_by_role("button", name="认领").click()
    task = page.locator("section.task", has_text=born)
    assert steward in await task.inner_text()
    await task.get_by_role("button", name="同一人").click()
    await screenshot(page, "steward-confirm", exchange.backend)
    await page.get_by_role("button", name="确认").click()
    await page.wait_for_url(re.compile("/console/steward"))
    assert await page.locator("section.task", has_text=born).count() == 0

    # The link history of a record of any domain.
    await page.goto(f"{exchange.base_url}/console/steward/history?domain={b.org_id}&local_id={local}")  # type: ignore[attr-defined]
    history = await page.locator("table").inner_text()
    assert a.org_id in history  # type: ignore[attr-defined]
    assert "review-same" in history
    await screenshot(page, "steward-history", exchange.backend)
    assert page.csp_violations == []  # type: ignore[attr-defined]


async def test_clinician_finds_a_patient_and_opens_a_shared_document(exchange: Exchange, page: Any) -> None:
    a, b = await _hospitals(exchange)
    patient = await _shared_document(exchange, a, b, secrets.token_hex(16))
    doctor = await _user(exchange, b.org_id, "doctor", "李医生", "全科")  # type: ignore[attr-defined]

    await sign_in(page, exchange.base_url, b.org_id, doctor, PASSWORD)  # type: ignore[attr-defined]
    assert page.url.endswith("/console/clinician")
    # A name alone is not enough to search the region: the screen says what is.
    await page.get_by_label("姓", exact=True).fill("张")
    await page.get_by_label("名", exact=True).fill("三")
    await page.get_by_role("button", name="查询").click()
    assert "search-too-broad" in await page.locator("div.error").inner_text()
    assert await page.locator("table.patients").count() == 0
    await page.get_by_label("出生日期").fill(patient["birth_date"])
    await page.get_by_role("button", name="查询").click()
    row = page.locator("table.patients tbody tr", has_text=b.org_id)  # type: ignore[attr-defined]
    assert "张三" in await row.first.inner_text()
    # Hospital A's record of him is there to pick the person, masked: no national id in clear,
    # no phone, no street.
    other = await page.locator("table.patients tbody tr", has_text=a.org_id).first.inner_text()  # type: ignore[attr-defined]
    assert "张三" in other
    assert patient["national_id"] not in other
    assert patient["national_id"][-4:] in other
    assert "*" in other
    assert "西城区" in other
    results = await page.locator("table.patients").inner_text()
    assert "13800138000" not in results
    assert "金融街" not in results
    await check_accessibility(page)
    await screenshot(page, "clinician-search", exchange.backend)
    await row.first.get_by_role("link", name=re.compile("共享文档")).click()
    assert "出院小结" in await page.locator("table.documents").inner_text()
    await screenshot(page, "clinician-documents", exchange.backend)
    await page.locator("table.documents").get_by_role("link").first.click()
    viewer = await page.locator("article.cda").inner_text()
    assert "社区获得性肺炎" in viewer
    assert await page.locator("section.placeholder").count() == 0  # worklists live on the search screen
    await screenshot(page, "clinician-viewer", exchange.backend)
    assert page.csp_violations == []  # type: ignore[attr-defined]


async def test_wrong_password_locks_after_the_limit(exchange: Exchange, page: Any) -> None:
    a, _ = await _hospitals(exchange)
    username = await _user(exchange, a.org_id, "doctor", "王医生")  # type: ignore[attr-defined]
    for _ in range(4):
        await sign_in(page, exchange.base_url, a.org_id, username, "not-the-password")  # type: ignore[attr-defined]
        assert "用户名或密码错误" in await page.locator("#signin-error").inner_text()
    await sign_in(page, exchange.base_url, a.org_id, username, "not-the-password")  # type: ignore[attr-defined]
    assert "锁定" in await page.locator("#signin-error").inner_text()
    # Locked: even the right password is refused now.
    await sign_in(page, exchange.base_url, a.org_id, username, PASSWORD)  # type: ignore[attr-defined]
    assert "锁定" in await page.locator("#signin-error").inner_text()
    await check_accessibility(page)
    await screenshot(page, "signin-locked", exchange.backend)


async def test_page_scripts_cannot_read_the_token(exchange: Exchange, page: Any) -> None:
    a, _ = await _hospitals(exchange)
    username = await _user(exchange, a.org_id, "doctor", "赵医生")  # type: ignore[attr-defined]
    await sign_in(page, exchange.base_url, a.org_id, username, PASSWORD)  # type: ignore[attr-defined]
    assert page.url.endswith("/console/clinician")
    cookies = {c["name"]: c for c in await page.context.cookies()}
    assert cookies["hie_console"]["httpOnly"] is True
    assert cookies["hie_console"]["sameSite"] == "Strict"
    assert "hie_console" not in await page.evaluate("document.cookie")
    # No token anywhere in the page, and the API refuses a script that has none to send.
    assert "eyJ" not in await page.content()
    status = await page.evaluate(
        "async () => { try { return (await fetch('/api/v1/audit/events')).status } catch { return 'blocked' } }"
    )
    assert status == "blocked"  # CSP connect-src 'none': page scripts make no requests at all
    # The session cookie is not an API credential either.
    with_cookies = await page.request.get(f"{exchange.base_url}/api/v1/audit/events")
    assert with_cookies.status == 401
    # Inline script is refused by the Content-Security-Policy.
    await page.evaluate(
        "() => { const s = document.createElement('script'); s.textContent = 'window.injected = 1';"
        " document.body.appendChild(s); }"
    )
    assert await page.evaluate("() => window.injected === undefined")
    # A change without the session's CSRF token is refused.
    forged = await page.request.post(
        f"{exchange.base_url}/console/preferences", form={"purpose": "emergency"}, max_redirects=0
    )
    assert forged.status == 403


async def test_administrator_adds_a_person_who_then_signs_in(exchange: Exchange, page: Any, browser: Any) -> None:
    a, _ = await _hospitals(exchange)
    admin = await _user(exchange, a.org_id, "admin", "信息科管理员", "信息科")  # type: ignore[attr-defined]
    await sign_in(page, exchange.base_url, a.org_id, admin, PASSWORD)  # type: ignore[attr-defined]
    assert page.url.endswith("/console/users")
    newcomer = f"nurse{secrets.token_hex(3)}"
    await page.get_by_label("用户名").fill(newcomer)
    await page.get_by_label("姓名").fill("司马护士")
    await page.get_by_label("角色").select_option("nurse")
    await page.get_by_label("科室").fill("急诊科")
    await page.get_by_role("button", name="添加用户").click()
    one_time = (await page.locator("#one-time-password").inner_text()).strip()
    assert "司马护士" in await page.locator("table").inner_text()
    await check_accessibility(page)
    await screenshot(page, "admin-users", exchange.backend)

    other = await browser.new_context(locale="en-US")
    try:
        second = await other.new_page()
        await second.goto(f"{exchange.base_url}/console/login?lang=en")
        await second.get_by_label("Organisation id").fill(a.org_id)  # type: ignore[attr-defined]
        await second.get_by_label("Username").fill(newcomer)
        await second.get_by_label("Password").fill(one_time)
        await second.get_by_role("button", name="Sign in", exact=True).click()
        await second.wait_for_url(re.compile("/console/clinician"))
        assert "Find a patient" in await second.locator("h1").inner_text()
        assert "司马护士" in await second.locator("header").inner_text()
        await screenshot(second, "clinician-english", exchange.backend)
    finally:
        await other.close()


async def test_sign_in_and_search_by_keyboard_alone(exchange: Exchange, page: Any) -> None:
    a, _ = await _hospitals(exchange)
    username = await _user(exchange, a.org_id, "doctor", "钱医生")  # type: ignore[attr-defined]
    await page.goto(f"{exchange.base_url}/console/login")
    await page.keyboard.press("Tab")  # the skip link comes first
    await page.keyboard.press("Tab")
    assert await page.evaluate("document.activeElement.id") == "org"
    await page.keyboard.type(a.org_id)  # type: ignore[attr-defined]
    await page.keyboard.press("Tab")
    await page.keyboard.type(username)
    await page.keyboard.press("Tab")
    await page.keyboard.type(PASSWORD)
    await page.keyboard.press("Enter")
    await page.wait_for_url(re.compile("/console/clinician"))
    # The skip link leads straight to the page's content.
    await page.keyboard.press("Tab")
    assert await page.evaluate("document.activeElement.className") == "skip"
    await page.keyboard.press("Enter")
    assert await page.evaluate("document.activeElement.id") == "main"


async def test_steward_links_and_unlinks_two_records_of_one_hospital(exchange: Exchange, page: Any) -> None:
    _, b = await _hospitals(exchange)
    first, second = f"LK-{secrets.token_hex(3)}", f"LK-{secrets.token_hex(3)}"
    for local_id in (first, second):
        registered = await b.call("POST", "/api/v1/patients", json={"local_id": local_id, **person("诸葛亮")})
        assert registered.status_code == 201, registered.text
    ops = await _platform_operator(exchange)
    steward = await _user(exchange, ops.org_id, "data-steward", "冯管理", "主索引管理组")  # type: ignore[attr-defined]
    await sign_in(page, exchange.base_url, ops.org_id, steward, PASSWORD)  # type: ignore[attr-defined]

    # The steward names both records, domain and local id: B's, not the steward's own organisation.
    await page.goto(f"{exchange.base_url}/console/steward/link")
    await page.get_by_label("机构", exact=True).fill(b.org_id)  # type: ignore[attr-defined]
    await page.get_by_label("院内号", exact=True).fill(second)
    await page.get_by_label("目标机构").fill(b.org_id)  # type: ignore[attr-defined]
    await page.get_by_label("目标院内号").fill(first)
    await check_accessibility(page)
    await page.get_by_role("button", name="链接为同一人").click()
    # Nothing happens before the confirmation.
    summary = await page.locator("dl").inner_text()
    assert second in summary
    assert first in summary
    history_url = f"{exchange.base_url}/console/steward/history?domain={b.org_id}&local_id={second}"  # type: ignore[attr-defined]
    await screenshot(page, "steward-link-confirm", exchange.backend)
    await page.get_by_role("button", name="确认").click()
    assert "已完成" in await page.locator("h1").inner_text()

    await page.goto(history_url)
    history = await page.locator("table").inner_text()
    assert "steward" in history
    assert "link" in history
    assert first in history
    await page.get_by_role("button", name="撤销链接").click()
    assert second in await page.locator("dl").inner_text()
    await page.get_by_role("button", name="确认").click()
    assert "已完成" in await page.locator("h1").inner_text()
    await page.goto(history_url)
    assert "unlink" in (await page.locator("table").inner_text()).lower()
    await screenshot(page, "steward-unlinked", exchange.backend)
    # The records are the hospital's: retiring one (a merge) is not the platform's act.
    assert await page.locator("a[href='/console/records/merge']").count() == 0
    assert page.csp_violations == []  # type: ignore[attr-defined]


async def test_hospital_administrator_merges_and_unmerges_its_records(exchange: Exchange, page: Any) -> None:
    _, b = await _hospitals(exchange)
    survivor, subsumed = f"MS-{secrets.token_hex(3)}", f"MD-{secrets.token_hex(3)}"
    for local_id in (survivor, subsumed):
        registered = await b.call("POST", "/api/v1/patients", json={"local_id": local_id, **person("诸葛亮")})
        assert registered.status_code == 201, registered.text
    admin = await _user(exchange, b.org_id, "admin", "病案室管理员", "病案室")  # type: ignore[attr-defined]
    await sign_in(page, exchange.base_url, b.org_id, admin, PASSWORD)  # type: ignore[attr-defined]

    await page.get_by_role("link", name="合并本机构两条记录").click()
    await page.get_by_label("保留记录院内号").fill(survivor)
    await page.get_by_label("被合并记录院内号").fill(subsumed)
    await page.get_by_role("button", name="合并本机构两条记录").click()
    # Nothing happens before the confirmation.
    assert subsumed in await page.locator("dl").inner_text()
    await page.get_by_role("button", name="确认").click()
    assert "已完成" in await page.locator("h1").inner_text()

    await page.goto(f"{exchange.base_url}/console/steward/history?domain={b.org_id}&local_id={subsumed}")  # type: ignore[attr-defined]
    assert "merge" in (await page.locator("table").inner_text()).lower()
    await page.get_by_role("button", name="撤销合并").click()
    # The confirmation submitted twice (a double click, a resent form) is one unmerge: the second
    # submission carries the page's key and gets the first answer, not an error.
    fields = await page.evaluate(
        """() => Object.fromEntries(new FormData(document.querySelector('form[action="/console/records/unmerge"]')))"""
    )
    # (The page's CSP allows no fetch: the browser context's own request client, its cookies.)
    answers = [
        await page.context.request.post(f"{exchange.base_url}/console/records/unmerge", form=fields, max_redirects=0)
        for _ in range(2)
    ]
    assert [a.status for a in answers] == [200, 200]
    assert ["已完成" in await a.text() for a in answers] == [True, True]
    await page.goto(f"{exchange.base_url}/console/steward/history?domain={b.org_id}&local_id={subsumed}")  # type: ignore[attr-defined]
    assert "unmerge" in (await page.locator("table").inner_text()).lower()
    await screenshot(page, "admin-unmerged", exchange.backend)
