"""The clinician's referral and consultation screens in a real headless Chromium against the
running exchange: a doctor at a community centre refers a patient to a hospital, the hospital's
doctor accepts, schedules, records the arrival and completes with an outcome, and the referring
doctor reads the outcome (and the attached PDF opens in the viewer); a consultation is requested,
answered with a signed report, and the report read by the requester — all in the browser, through
the exchange's public API. Screenshots go to test-artifacts/console/ (gitignored)."""

from __future__ import annotations

import asyncio
import datetime
import re
import secrets
from dataclasses import dataclass
from typing import Any

import pytest

from gateway.client import HospitalClient, Practitioner
from gateway.organizations import set_tier
from tests.conftest import Exchange
from tests.support import console
from tests.support.console import CHROMIUM, PASSWORD, _user, check_accessibility, screenshot, sign_in
from tests.support.factories import document, person

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)"
    ),
]

SCOPES = "system/Patient.crs system/DocumentReference.crs system/ServiceRequest.crus system/AuditEvent.rs"
ADMIN = Practitioner(id="ADM-1", name="信息科", role="admin", department="信息科")
# A one-page PDF (what a community centre's ECG machine exports).
PDF = (
    b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
    b"2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj\n"
    b"3 0 obj<</Type/Page/MediaBox[0 0 200 200]/Parent 2 0 R>>endobj\n"
    b"trailer<</Root 1 0 R>>\n%%EOF\n"
)


# The same Chromium and page (CSP violations collected) as the console's other browser tests.
browser = console.browser
page = console.page


@dataclass
class Region:
    exchange: Exchange
    community: HospitalClient
    hospital: HospitalClient
    community_org: str
    hospital_org: str
    patient: dict[str, Any]
    community_local: str
    hospital_local: str


@pytest.fixture
async def region(exchange: Exchange) -> Any:
    """A community centre and a tertiary hospital that both registered 欧阳娜娜 (the arrangement a
    hospital system makes through the API; the people then work in the browser)."""
    community = await exchange.member(scopes=SCOPES, name="城东社区卫生服务中心")
    hospital = await exchange.member(scopes=SCOPES, name="市第一人民医院")
    c_org, h_org = community.org_id, hospital.org_id  # type: ignore[attr-defined]
    await set_tier(exchange.settings, org_id=c_org, tier="community")
    await set_tier(exchange.settings, org_id=h_org, tier="tertiary")
    patient = person("欧阳娜娜", address={"province": "浙江省", "district": "上城区", "line": "解放路 8 号"})
    c_local, h_local = f"C-{secrets.token_hex(3)}", f"H-{secrets.token_hex(3)}"
    for client, local in ((community, c_local), (hospital, h_local)):
        made = await client.call("POST", "/api/v1/patients", json={"local_id": local, **patient})
        assert made.status_code == 201, made.text
    yield Region(exchange, community, hospital, c_org, h_org, patient, c_local, h_local)
    for client in (community, hospital):
        await client.aclose()


async def _find_own_record(page: Any, region: Region) -> None:
    await page.goto(f"{region.exchange.base_url}/console/clinician")
    await page.get_by_label("身份证号").fill(region.patient["national_id"])
    await page.get_by_role("button", name="查询").click()
    await page.wait_for_load_state()


async def _reload_until(page: Any, selector: str, text: str, within: float = 20.0) -> None:
    """Reload `page` until `selector` shows `text` (an effect that arrives through an outbox)."""
    deadline = asyncio.get_running_loop().time() + within
    while text not in await page.locator(selector).inner_text():
        assert asyncio.get_running_loop().time() < deadline, f"{text!r} never appeared in {selector}"
        await asyncio.sleep(0.5)
        await page.reload()


async def _state(page: Any, selector: str) -> str:
    return str(await page.locator(selector).get_attribute("data-state"))


async def test_referral_round_trip_with_outcome_and_pdf_in_the_browser(region: Region, page: Any, browser: Any) -> None:
    s, backend, base = region, region.exchange.backend, region.exchange.base_url
    ecg = await s.community.call(
        "POST",
        "/api/v1/documents",
        json=document(
            s.community_local,
            PDF,
            mime_type="application/pdf",
            title="心电图报告",
            type={"system": "http://loinc.org", "code": "11524-6", "display": "心电图报告"},
        ),
    )
    assert ecg.status_code == 201, ecg.text
    start = datetime.datetime.now(datetime.UTC).replace(microsecond=0) + datetime.timedelta(days=1)
    slots = await s.hospital.call(
        "POST",
        "/api/v1/referral-slots",
        json={
            "slots": [
                {
                    "department": "心内科",
                    "start": start.isoformat(),
                    "end": (start + datetime.timedelta(minutes=30)).isoformat(),
                }
            ]
        },
        headers={"Idempotency-Key": secrets.token_hex(8)},
    )
    assert slots.status_code == 201, slots.text
    gp = await _user(s.exchange, s.community_org, "doctor", "诸葛全科", "全科")
    cardiologist = await _user(s.exchange, s.hospital_org, "doctor", "司马心内", "心内科")

    # A: find the patient, refer from the own record.
    await sign_in(page, base, s.community_org, gp, PASSWORD)
    await _find_own_record(page, s)
    own = page.locator("table.patients tbody tr", has_text=s.community_org)
    assert "欧阳娜娜" in await own.inner_text()
    await own.get_by_role("link", name=re.compile("发起转诊")).click()
    await page.wait_for_url(re.compile("/console/referrals/new"))
    assert await page.get_by_label("本机构院内号").input_value() == s.community_local
    await page.get_by_label("接收机构代码").fill(s.hospital_org)
    await page.get_by_label("接收科室").fill("心内科")
    await page.get_by_label("紧急程度").select_option("urgent")
    await page.get_by_label("理由 / 说明").fill("反复胸闷两周，心电图 ST 段改变，基层无法明确诊断")
    await page.get_by_label("初步诊断编码 (ICD-10)").fill("I20.0")
    await page.get_by_label("初步诊断名称").fill("不稳定型心绞痛")
    await page.get_by_label(re.compile("心电图报告")).check()
    await check_accessibility(page)
    await screenshot(page, "referral-new", backend)
    await page.get_by_role("button", name="提交转诊").click()
    await page.wait_for_url(re.compile(r"/console/referrals/[^/?]+$"))
    referral_url = page.url
    assert await _state(page, "#referral-state") == "requested"
    assert "不稳定型心绞痛" in await page.locator("dl.summary").inner_text()
    # The referrer may only cancel now: no accept button on this side.
    assert await page.get_by_role("button", name="同意接收").count() == 0
    await page.goto(f"{base}/console/referrals?box=outgoing")
    assert await page.locator("table.referrals tbody tr").count() >= 1
    await screenshot(page, "referral-outgoing", backend)

    # B: the incoming worklist, accept, schedule, arrival, completion with a written outcome.
    other = await browser.new_context(locale="zh-CN")
    try:
        b_page = await other.new_page()
        await sign_in(b_page, base, s.hospital_org, cardiologist, PASSWORD)
        await b_page.goto(f"{base}/console/referrals?box=incoming&state=requested")
        await b_page.locator("table.referrals tbody tr").first.get_by_role("link").click()
        await b_page.wait_for_url(re.compile(r"/console/referrals/[^/?]+$"))
        assert b_page.url == referral_url
        await check_accessibility(b_page)
        await screenshot(b_page, "referral-incoming", backend)
        await b_page.get_by_role("button", name="同意接收").click()
        assert await _state(b_page, "#referral-state") == "accepted"
        # The attached PDF opens through the viewer (purpose referral, under the grant).
        await b_page.locator("ul.attached a").first.click()
        # The grant reaches consent through the referral service's outbox right after the accept
        # commits: on a loaded machine the first open may come before it; a reload then shows it.
        await _reload_until(b_page, "h1", "心电图报告")
        pdf_link = b_page.locator("#pdf-link")
        opened = await b_page.request.get(f"{base}{await pdf_link.get_attribute('href')}")
        assert opened.status == 200
        assert opened.headers["content-type"].startswith("application/pdf")
        assert opened.headers["content-disposition"] == "inline"
        assert "sandbox" in opened.headers["content-security-policy"]
        assert await opened.body() == PDF
        await screenshot(b_page, "referral-pdf-viewer", backend)
        await b_page.goto(referral_url)
        await b_page.get_by_role("button", name="预约").click()
        assert await _state(b_page, "#referral-state") == "scheduled"
        await b_page.get_by_role("button", name="患者到达").click()
        assert await _state(b_page, "#referral-state") == "arrived"
        complete = b_page.locator("form.move", has=b_page.get_by_role("heading", name="完成并返回结果"))
        await complete.get_by_label("患者在本机构的院内号").fill(s.hospital_local)
        await complete.get_by_label("诊疗结果", exact=True).fill(
            "冠脉造影示前降支狭窄 70%，已行支架植入术。出院带药：阿司匹林、氯吡格雷。"
        )
        await check_accessibility(b_page)
        await complete.get_by_role("button", name="完成并返回结果").click()
        assert await _state(b_page, "#referral-state") == "completed"
        moves = [h.strip() for h in await b_page.locator("table.history tbody tr td:nth-child(2)").all_inner_texts()]
        assert moves == ["同意接收", "预约", "患者到达", "完成并返回结果"]
        assert "司马心内" not in moves  # the table names the user id; the names display elsewhere
        await screenshot(b_page, "referral-completed", backend)
    finally:
        await other.close()

    # A: the outcome is back; read it and acknowledge (the loop closes).
    await page.goto(referral_url)
    assert await _state(page, "#referral-state") == "completed"
    await page.locator("#outcome-link").click()
    outcome = await page.locator("pre.document").inner_text()
    assert "支架植入术" in outcome
    await screenshot(page, "referral-outcome", backend)
    await page.goto(referral_url)
    await page.get_by_role("button", name="确认已阅结果").click()
    assert await _state(page, "#referral-state") == "closed"
    assert page.csp_violations == []  # type: ignore[attr-defined]


async def test_consultation_requested_reported_and_read_in_the_browser(region: Region, page: Any, browser: Any) -> None:
    s, backend, base = region, region.exchange.backend, region.exchange.base_url
    consent = await s.community.call(
        "POST",
        "/api/v1/documents",
        json=document(
            s.community_local, "远程会诊知情同意书（患者本人签字）".encode(), title="知情同意书", mime_type="text/plain"
        ),
    )
    assert consent.status_code == 201, consent.text
    gp = await _user(s.exchange, s.community_org, "doctor", "欧阳全科", "全科")
    specialist = await _user(s.exchange, s.hospital_org, "doctor", "上官主任", "呼吸科")
    # The hospital's administrator lists the specialist in the directory (the hospital's system).
    listed = await s.hospital.call(
        "PUT",
        f"/api/v1/specialists/{specialist}",
        as_user=ADMIN,
        json={
            "name": "上官主任",
            "department": "呼吸科",
            "professional_title": "主任医师",
            "years_independent_practice": 15,
            "kinds": ["specialist"],
        },
        headers={"Idempotency-Key": secrets.token_hex(8)},
    )
    assert listed.status_code == 200, listed.text

    # A: request from the own record, the specialist picked from B's directory.
    await sign_in(page, base, s.community_org, gp, PASSWORD)
    await _find_own_record(page, s)
    own = page.locator("table.patients tbody tr", has_text=s.community_org)
    await own.get_by_role("link", name=re.compile("申请会诊")).click()
    await page.wait_for_url(re.compile("/console/consultations/new"))
    await page.locator("#g-consultant").fill(s.hospital_org)
    await page.get_by_role("button", name="查找该机构的专家").click()
    await page.get_by_label("邀请专家").select_option(specialist)
    assert await page.locator("#f-consultant_organization_id").input_value() == s.hospital_org
    await page.get_by_label("会诊问题").fill("右肺上叶结节性质待定，是否需要手术")
    await page.get_by_label(re.compile("知情同意书")).check()
    await check_accessibility(page)
    await screenshot(page, "consultation-new", backend)
    await page.get_by_role("button", name="提交会诊申请").click()
    await page.wait_for_url(re.compile(r"/console/consultations/[^/?]+$"))
    consultation_url = page.url
    assert await _state(page, "#consultation-state") == "requested"
    await page.get_by_role("button", name="登记知情同意").click()
    assert "患者本人" in await page.locator("dl.summary").inner_text()

    # B: the specialist accepts, reviews and signs the report.
    other = await browser.new_context(locale="zh-CN")
    try:
        b_page = await other.new_page()
        await sign_in(b_page, base, s.hospital_org, specialist, PASSWORD)
        await b_page.goto(f"{base}/console/consultations?box=incoming")
        await b_page.locator("table.consultations tbody tr").first.get_by_role("link").click()
        assert b_page.url == consultation_url
        await b_page.get_by_role("button", name="同意接收").click()
        assert await _state(b_page, "#consultation-state") == "assigned"
        await b_page.get_by_role("button", name="开始审阅").click()
        assert await _state(b_page, "#consultation-state") == "in_review"
        await b_page.get_by_label("所见").fill("右肺上叶见 8mm 磨玻璃结节，边缘毛糙")
        await b_page.get_by_label("印象 / 诊断意见").fill("考虑早期肺腺癌可能")
        await b_page.get_by_label("建议").fill("建议胸外科就诊，限期手术")
        await check_accessibility(b_page)
        await screenshot(b_page, "consultation-report-form", backend)
        await b_page.get_by_role("button", name="签发正式报告").click()
        assert await _state(b_page, "#consultation-state") == "report_final"
        assert "签名有效" in await b_page.locator("article.report-version").first.inner_text()
    finally:
        await other.close()

    # A: the signed report, read where the request was made.
    await page.goto(consultation_url)
    assert await _state(page, "#consultation-state") == "report_final"
    report = await page.locator("article.report-version").first.inner_text()
    assert "考虑早期肺腺癌可能" in report
    assert "签名有效" in report
    await screenshot(page, "consultation-report-read", backend)
    await page.get_by_role("button", name="结束会诊").click()
    assert await _state(page, "#consultation-state") == "closed"
    await page.goto(f"{base}/console/consultations?box=outgoing&state=closed")
    assert await page.locator("table.consultations tbody tr").count() == 1
    assert page.csp_violations == []  # type: ignore[attr-defined]
