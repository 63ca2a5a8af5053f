"""Remote consultation end to end through the gateway (real HTTP, real services): an imaging read
with a study reference, more information requested and provided, a report signed with the
consulting hospital's own key, filed in the registry and verified by the requester with the
published keys, an amendment; an emergency ECG from the on-call roster within its clock; an
interactive MDT with slot booking, a double-booking race and a cancellation; a clock breach
fired once across a restart; the informed consent (a guardian for a minor) and the
qualification rule."""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest

from gateway.client import HospitalClient, Practitioner
from services.shared import workflow as shared_workflow
from services.teleconsult import report
from services.teleconsult.servicer import TeleconsultationsServicer
from tests.conftest import Exchange, base_settings, start_exchange
from tests.support.factories import document, person
from tests.support.webhooks import Receiver

SCOPES = "system/Patient.crs system/DocumentReference.crs system/ServiceRequest.crus system/AuditEvent.rs"
GP = Practitioner(id="Q-GP-1", name="全科医生", role="doctor", department="全科")
ADMIN = Practitioner(id="C-ADM-1", name="信息科", role="admin", department="信息科")
RADIOLOGIST = Practitioner(id="C-RAD-1", name="影像科主任", role="doctor", department="影像科")
CARDIOLOGIST = Practitioner(id="C-ECG-1", name="心电图室医生", role="doctor", department="心电图室")
ONCOLOGIST = Practitioner(id="C-ONC-1", name="肿瘤科主任", role="doctor", department="肿瘤科")
SURGEON = Practitioner(id="C-SUR-1", name="胸外科主任", role="doctor", department="胸外科")
STUDY_UID = "1.2.156.112605.14038.20261205.1"


@dataclass
class Scene:
    exchange: Exchange
    q: HospitalClient  # the requesting (inviting) community hospital
    c: HospitalClient  # the consulting tertiary hospital
    local_id: str
    summary_id: str
    consent_form_id: str
    study_doc_id: str

    @property
    def c_org(self) -> str:
        return self.c.org_id  # type: ignore[attr-defined]

    async def request(self, **form: object) -> dict:
        body = {
            "patient_local_id": self.local_id,
            "consultant_organization_id": self.c_org,
            "kind": "imaging",
            "question": "右肺上叶结节性质待定",
            "purpose": "明确诊断",
            "summary": "咳嗽两周，CT 示右肺上叶 8mm 结节",
            "document_ids": [self.summary_id],
            **form,
        }
        r = await self.q.call("POST", "/api/v1/consultations", purpose="consultation", json=body)
        assert r.status_code == 201, r.text
        return r.json()

    async def move(
        self, who: HospitalClient, cid: str, move: str, *, as_user: Practitioner | None = None, **body: object
    ):
        return await who.call(
            "POST", f"/api/v1/consultations/{cid}/{move}", purpose="consultation", json=body, as_user=as_user
        )

    async def consent(self, cid: str) -> None:
        r = await self.move(
            self.q,
            cid,
            "record-consent",
            informed_consent={"evidence_document_id": self.consent_form_id, "signer": "patient"},
        )
        assert r.status_code == 200, r.text

    async def sign(self, cid: str, content: dict, *, amend: bool = False, user: Practitioner = RADIOLOGIST):
        draft = await self.c.call(
            "POST",
            f"/api/v1/consultations/{cid}/report-draft",
            purpose="consultation",
            json={"report": content, "amend": amend},
            as_user=user,
        )
        assert draft.status_code == 200, draft.text
        resource = draft.json()["diagnostic_report"]
        signature = report.sign(resource, self.c.key)
        return await self.move(
            self.c, cid, "amend" if amend else "sign", as_user=user, diagnostic_report=resource, signature=signature
        )


async def _specialist(c: HospitalClient, p: Practitioner, kinds: list[str], years: int = 10) -> dict:
    r = await c.call(
        "PUT",
        f"/api/v1/specialists/{p.id}",
        as_user=ADMIN,
        json={
            "name": p.name,
            "department": p.department,
            "professional_title": "主任医师",
            "years_independent_practice": years,
            "kinds": kinds,
        },
    )
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture
async def scene(exchange: Exchange) -> AsyncIterator[Scene]:
    q = await exchange.member(scopes=SCOPES, name="城东社区卫生服务中心")
    c = await exchange.member(scopes=SCOPES, name="市第一人民医院")
    q.practitioner = GP
    c.practitioner = RADIOLOGIST
    local_id = f"TC-{secrets.token_hex(3)}"
    patient = person("孙十五")
    assert (await q.call("POST", "/api/v1/patients", json={"local_id": local_id, **patient})).status_code == 201
    summary = await q.call("POST", "/api/v1/documents", json=document(local_id, "门诊病历：咳嗽两周".encode()))
    form = await q.call(
        "POST",
        "/api/v1/documents",
        json=document(local_id, "远程会诊知情同意书（患者签字）".encode(), title="知情同意书"),
    )
    study = await q.call(
        "POST",
        "/api/v1/documents",
        json={
            "source_document_id": f"CT-{secrets.token_hex(4)}",
            "patient_local_id": local_id,
            "type": {"system": "http://loinc.org", "code": "18748-4", "display": "胸部CT"},
            "title": "胸部CT",
            "imaging_study": {
                "study_instance_uid": STUDY_UID,
                "wado_rs_url": f"https://pacs.q.example/wado-rs/studies/{STUDY_UID}",
            },
        },
    )
    assert summary.status_code == form.status_code == 201, form.text
    assert study.status_code == 201, study.text
    for p, kinds in (
        (RADIOLOGIST, ["imaging"]),
        (CARDIOLOGIST, ["ecg"]),
        (ONCOLOGIST, ["specialist"]),
        (SURGEON, ["specialist"]),
    ):
        await _specialist(c, p, kinds)
    yield Scene(
        exchange,
        q,
        c,
        local_id,
        summary.json()["document_id"],
        form.json()["document_id"],
        study.json()["document_id"],
    )
    for member in (q, c):
        await member.aclose()


async def test_imaging_read_more_information_signed_report_verified_and_amended(scene: Scene) -> None:
    s = scene
    created = await s.request(
        imaging_studies=[
            {
                "study_instance_uid": STUDY_UID,
                "wado_rs_url": f"https://pacs.q.example/wado-rs/studies/{STUDY_UID}",
                "document_id": s.study_doc_id,
            }
        ],
        invited_practitioner_id=RADIOLOGIST.id,
    )
    cid = created["consultation_id"]
    assert created["state"] == "requested"
    assert created["question"] == "右肺上叶结节性质待定"
    assert [k["name"] for k in created["clocks"]] == ["turnaround"]

    # Before the informed consent the consultant cannot accept.
    early = await s.move(s.c, cid, "accept")
    assert (early.status_code, early.json()["error"]["reason"]) == (422, "consultation-consent-missing")
    # Only the requester records consent, the consultant accepts.
    wrong = await s.move(
        s.c, cid, "record-consent", informed_consent={"evidence_document_id": "x", "signer": "patient"}
    )
    assert (wrong.status_code, wrong.json()["error"]["reason"]) == (403, "consultation-party")
    await s.consent(cid)
    # The consultant cannot see the material before accepting.
    links = await s.c.call("GET", f"/api/v1/consultations/{cid}/imaging", purpose="consultation")
    assert links.status_code == 403, links.text
    accepted = await s.move(s.c, cid, "accept", reason="同意会诊")
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["assignee_ids"] == [RADIOLOGIST.id]
    await s.exchange.audit_settled()  # the grant reaches consent
    links = await s.c.call("GET", f"/api/v1/consultations/{cid}/imaging", purpose="consultation")
    assert links.status_code == 200, links.text
    assert links.json()["imaging_studies"][0]["wado_rs_url"].endswith(STUDY_UID)

    assert (await s.move(s.c, cid, "start-review")).json()["state"] == "in_review"
    asked = await s.move(s.c, cid, "request-information", text="请补充既往胸片")
    assert asked.json()["state"] == "information_requested"
    assert asked.json()["clocks"][0]["paused"] is True
    old = await s.q.call("POST", "/api/v1/documents", json=document(s.local_id, "2025年胸片报告".encode()))
    old_id = old.json()["document_id"]
    before = await s.c.call("GET", f"/api/v1/documents/{old_id}/content", purpose="consultation")
    assert before.status_code == 403, before.text
    answered = await s.move(
        s.q, cid, "provide-information", text="已上传去年胸片", document_ids=[old.json()["document_id"]]
    )
    assert answered.status_code == 200, answered.text
    body = answered.json()
    assert body["state"] == "in_review"
    assert body["clocks"][0]["paused"] is False
    assert [m["move"] for m in body["messages"]] == ["request-information", "provide-information"]
    # The answer's documents join the consultant's grant.
    await s.exchange.audit_settled()
    after = await s.c.call("GET", f"/api/v1/documents/{old_id}/content", purpose="consultation")
    assert after.status_code == 200, after.text

    preliminary = await s.move(s.c, cid, "preliminary", report={"findings": "右肺上叶磨玻璃结节", "impression": "待定"})
    assert preliminary.status_code == 200, preliminary.text
    assert preliminary.json()["state"] == "report_preliminary"
    signed = await s.sign(
        cid, {"findings": "右肺上叶见 8mm 磨玻璃结节", "impression": "考虑原位腺癌可能", "recommendations": "3个月复查"}
    )
    assert signed.status_code == 200, signed.text
    assert signed.json()["state"] == "report_final"
    assert signed.json()["clocks"][0]["stopped"] is True
    # A final report is never edited: signing again is answered as a retry and files nothing.
    again = await s.sign(cid, {"impression": "改为良性"})
    assert again.status_code == 200, again.text
    assert again.json()["report_version"] == 2
    listed = await s.q.call("GET", "/api/v1/documents", params={"patient_local_id": s.local_id})
    assert [e["title"] for e in listed.json()["entries"]].count("远程会诊报告") == 1
    await s.exchange.audit_settled()

    got = await s.q.call("GET", f"/api/v1/consultations/{cid}/report", purpose="consultation")
    assert got.status_code == 200, got.text
    final = got.json()["versions"][0]
    assert final["status"] == "final"
    assert final["impression"] == "考虑原位腺癌可能"
    # The requester verifies the signature with the consulting organisation's published keys.
    keys = (await s.q.http.get(f"{s.exchange.base_url}/api/v1/organizations/{s.c_org}/jwks.json")).json()["keys"]
    jws = base64.b64decode(final["provenance"]["signature"][0]["data"]).decode()
    header = jwt.get_unverified_header(jws)
    published = next(k for k in keys if k["kid"] == header["kid"])
    assert final["signer_key_id"] == header["kid"]
    jwt.api_jws.PyJWS().decode_complete(
        jws,
        key=jwt.PyJWK(published),
        algorithms=["ES384"],
        detached_payload=report.canonical(final["diagnostic_report"]),
    )
    tampered = {**final["diagnostic_report"], "conclusion": "良性"}
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.api_jws.PyJWS().decode_complete(
            jws, key=jwt.PyJWK(published), algorithms=["ES384"], detached_payload=report.canonical(tampered)
        )
    # Filed in the registry into the patient's record at the requesting hospital: hash checked.
    content = await s.q.call("GET", f"/api/v1/documents/{final['document_id']}/content", purpose="treatment")
    assert content.status_code == 200, content.text
    assert hashlib.sha256(content.content).hexdigest() == final["sha256"]
    bundle = json.loads(content.content)
    assert bundle["entry"][0]["resource"]["basedOn"] == [{"reference": f"ServiceRequest/{cid}"}]

    # A signature by a key not registered to the consultant is refused.
    draft = await s.c.call(
        "POST",
        f"/api/v1/consultations/{cid}/report-draft",
        purpose="consultation",
        json={"report": {"impression": "x"}, "amend": True},
    )
    from services.shared.keys import generate_ec_key

    forged = await s.move(
        s.c,
        cid,
        "amend",
        diagnostic_report=draft.json()["diagnostic_report"],
        signature=report.sign(draft.json()["diagnostic_report"], generate_ec_key()),
    )
    assert (forged.status_code, forged.json()["error"]["reason"]) == (403, "consultation-signature-key")

    amended = await s.sign(
        cid,
        {"findings": "右肺上叶见 8mm 磨玻璃结节", "impression": "考虑微浸润腺癌", "recommendations": "建议手术"},
        amend=True,
    )
    assert amended.status_code == 200, amended.text
    assert amended.json()["report_version"] == 3
    versions = (await s.q.call("GET", f"/api/v1/consultations/{cid}/report", purpose="consultation")).json()["versions"]
    assert [(v["version"], v["status"]) for v in versions] == [(3, "amended"), (2, "superseded"), (1, "preliminary")]
    entry = await s.q.call("GET", f"/api/v1/documents/{versions[1]['document_id']}", purpose="treatment")
    assert entry.json()["status"] == "superseded", entry.text

    late_cancel = await s.move(s.q, cid, "cancel")
    assert (late_cancel.status_code, late_cancel.json()["error"]["reason"]) == (422, "consultation-state")
    closed = await s.move(s.q, cid, "close", reason="已阅，纳入诊疗")
    assert closed.json()["state"] == "closed"
    history = closed.json()["history"]
    assert [h["move"] for h in history] == [
        "record-consent",
        "accept",
        "start-review",
        "request-information",
        "provide-information",
        "preliminary",
        "sign",
        "amend",
        "close",
    ]
    assert all(h["organization_id"] and h["practitioner_id"] and h["changed"] for h in history)

    # Each move is audited once.
    for move in ("sign", "amend", "close"):
        assert len(await _breach_or_move_events(s.exchange, f"consultation.{move}", cid)) == 1


async def test_emergency_ecg_from_the_on_call_roster_within_its_clock(scene: Scene) -> None:
    s = scene
    now = datetime.datetime.now(datetime.UTC)
    shift = await s.c.call(
        "POST",
        "/api/v1/roster-shifts",
        as_user=ADMIN,
        json={
            "practitioner_id": CARDIOLOGIST.id,
            "kind": "ecg",
            "start": (now - datetime.timedelta(hours=1)).isoformat(),
            "end": (now + datetime.timedelta(hours=7)).isoformat(),
        },
    )
    assert shift.status_code == 201, shift.text
    on_call = await s.q.call("GET", f"/api/v1/organizations/{s.c_org}/on-call", params={"kind": "ecg"})
    assert [x["practitioner_id"] for x in on_call.json()["shifts"]] == [CARDIOLOGIST.id]
    created = await s.request(
        kind="ecg", urgency="emergency", question="胸痛 1 小时，心电图 ST 段抬高？", any_available=True
    )
    cid = created["consultation_id"]
    due = datetime.datetime.fromisoformat(created["clocks"][0]["due"])
    assert (
        datetime.timedelta(minutes=29)
        < due - datetime.datetime.fromisoformat(created["created"])
        <= datetime.timedelta(minutes=30, seconds=1)
    )
    # The on-call cardiologist's roster worklist shows the waiting request; the radiologist's not.
    waiting = await s.c.call(
        "GET", "/api/v1/consultations", params={"box": "incoming", "on_call": "true"}, as_user=CARDIOLOGIST
    )
    assert [c["consultation_id"] for c in waiting.json()["consultations"]] == [cid]
    other = await s.c.call("GET", "/api/v1/consultations", params={"box": "incoming", "on_call": "true"})
    assert other.json()["consultations"] == []
    await s.consent(cid)
    accepted = await s.move(s.c, cid, "accept", as_user=CARDIOLOGIST)
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["assignee_ids"] == [CARDIOLOGIST.id]
    worklist = await s.c.call(
        "GET", "/api/v1/consultations", params={"box": "incoming", "practitioner_id": CARDIOLOGIST.id}
    )
    assert [c["consultation_id"] for c in worklist.json()["consultations"]] == [cid]
    by_state = await s.c.call("GET", "/api/v1/consultations", params={"box": "incoming", "state": ["assigned"]})
    assert [c["consultation_id"] for c in by_state.json()["consultations"]] == [cid]
    none_yet = await s.c.call("GET", "/api/v1/consultations", params={"box": "incoming", "state": ["report_final"]})
    assert none_yet.json()["consultations"] == []
    unknown = await s.c.call("GET", "/api/v1/consultations", params={"box": "incoming", "state": ["lost"]})
    assert (unknown.status_code, unknown.json()["error"]["reason"]) == (400, "consultation-state")
    assert (await s.move(s.c, cid, "start-review", as_user=CARDIOLOGIST)).status_code == 200
    signed = await s.sign(
        cid, {"findings": "II、III、aVF 导联 ST 段抬高", "impression": "急性下壁心肌梗死"}, user=CARDIOLOGIST
    )
    assert signed.status_code == 200, signed.text
    clock = signed.json()["clocks"][0]
    assert clock["stopped"]
    assert not clock["fired"]
    stats = await s.c.call("GET", "/api/v1/consultation-statistics")
    assert stats.status_code == 200, stats.text
    assert stats.json()["by_kind_mode"].get("ecg/asynchronous", 0) >= 1
    assert stats.json()["turnaround_median_hours"] < 0.5


async def test_interactive_mdt_booking_race_and_cancellation(scene: Scene) -> None:
    s = scene
    start = datetime.datetime.now(datetime.UTC).replace(microsecond=0) + datetime.timedelta(days=1)
    published = await s.c.call(
        "POST",
        "/api/v1/consultation-slots",
        as_user=ADMIN,
        json={
            "slots": [
                {
                    "practitioner_id": p.id,
                    "start": start.isoformat(),
                    "end": (start + datetime.timedelta(minutes=30)).isoformat(),
                }
                for p in (ONCOLOGIST, SURGEON)
            ]
        },
    )
    assert published.status_code == 201, published.text
    slot_ids = [x["slot_id"] for x in published.json()["slots"]]
    cids = []
    for _ in range(4):
        created = await s.request(kind="multidisciplinary", mode="interactive", question="肺癌术前 MDT 讨论")
        cid = created["consultation_id"]
        await s.consent(cid)
        one = await s.move(s.c, cid, "accept", assignee_ids=[ONCOLOGIST.id])
        assert (one.status_code, one.json()["error"]["reason"]) == (422, "consultation-mdt-size")
        accepted = await s.move(s.c, cid, "accept", assignee_ids=[ONCOLOGIST.id, SURGEON.id])
        assert accepted.status_code == 200, accepted.text
        cids.append(cid)
    # Four sessions race for the same two specialists' slots: exactly one holds them.
    results = await asyncio.gather(*(s.move(s.c, cid, "schedule", slot_ids=slot_ids) for cid in cids))
    codes = sorted(r.status_code for r in results)
    assert codes == [200, 422, 422, 422], [r.text for r in results]
    assert {r.json()["error"]["reason"] for r in results if r.status_code == 422} == {"consultation-slot-taken"}
    winner = next(r for r in results if r.status_code == 200).json()
    assert winner["state"] == "scheduled"
    assert winner["appointment"]["join_url"]
    slots = (await s.c.call("GET", f"/api/v1/organizations/{s.c_org}/consultation-slots")).json()["slots"]
    held = {x["slot_id"]: x["consultation_id"] for x in slots if x["slot_id"] in slot_ids}
    assert set(held.values()) == {winner["consultation_id"]}
    # The requester cancels: the slots are free again and the other session books them.
    cancelled = await s.move(s.q, winner["consultation_id"], "cancel", reason="患者转院")
    assert cancelled.json()["state"] == "cancelled"
    other = next(c for c in cids if c != winner["consultation_id"])
    for lost in cids:
        if lost not in {other, winner["consultation_id"]}:
            assert (await s.move(s.q, lost, "cancel")).status_code == 200
    rebooked = await s.move(s.c, other, "schedule", slot_ids=slot_ids)
    assert rebooked.status_code == 200, rebooked.text
    assert (await s.move(s.c, other, "start-session")).json()["state"] == "in_session"
    signed = await s.sign(
        other,
        {
            "opinions": [
                {"practitioner_id": ONCOLOGIST.id, "practitioner_name": ONCOLOGIST.name, "opinion": "建议新辅助化疗"},
                {"practitioner_id": SURGEON.id, "practitioner_name": SURGEON.name, "opinion": "可行肺叶切除"},
            ],
            "impression": "右肺上叶腺癌 cT1bN0M0",
            "conclusion": "先行手术，术后辅助治疗",
        },
        user=ONCOLOGIST,
    )
    assert signed.status_code == 200, signed.text
    final = (await s.q.call("GET", f"/api/v1/consultations/{other}/report", purpose="consultation")).json()["versions"][
        0
    ]
    assert [o["practitioner_id"] for o in final["opinions"]] == [ONCOLOGIST.id, SURGEON.id]
    assert final["conclusion"] == "先行手术，术后辅助治疗"


async def test_guardian_for_a_minor_qualification_and_coded_decline(scene: Scene) -> None:
    s = scene
    child_id = f"TC-CH-{secrets.token_hex(3)}"
    child = person("小明", national_id=None)
    born = datetime.date.today().replace(year=datetime.date.today().year - 8)
    from services.shared import gb11643

    body = f"110105{born:%Y%m%d}{secrets.randbelow(1000):03d}"
    child = person("小明", national_id=body + gb11643.check_digit(body))
    assert (await s.q.call("POST", "/api/v1/patients", json={"local_id": child_id, **child})).status_code == 201
    r = await s.q.call(
        "POST",
        "/api/v1/consultations",
        purpose="consultation",
        json={
            "patient_local_id": child_id,
            "consultant_organization_id": s.c_org,
            "kind": "ultrasound",
            "question": "先天性心脏病？",
        },
    )
    cid = r.json()["consultation_id"]
    self_signed = await s.move(
        s.q, cid, "record-consent", informed_consent={"evidence_document_id": s.consent_form_id, "signer": "patient"}
    )
    assert (self_signed.status_code, self_signed.json()["error"]["reason"]) == (422, "consultation-guardian-required")
    guardian = await s.move(
        s.q,
        cid,
        "record-consent",
        informed_consent={
            "evidence_document_id": s.consent_form_id,
            "signer": "guardian",
            "guardian_name": "王芳",
            "guardian_relationship": "母亲",
        },
    )
    assert guardian.status_code == 200, guardian.text
    assert guardian.json()["informed_consent"]["signer"] == "guardian"
    # A specialist with too few years of independent practice cannot be assigned.
    junior = Practitioner(id="C-US-2", name="超声科医生", role="doctor", department="超声科")
    entry = await _specialist(s.c, junior, ["ultrasound"], years=2)
    assert entry["qualified"] is False
    refused = await s.move(s.c, cid, "accept", assignee_ids=[junior.id])
    assert (refused.status_code, refused.json()["error"]["reason"]) == (422, "consultation-not-qualified")
    uncoded = await s.move(s.c, cid, "decline", reason="没空")
    assert (uncoded.status_code, uncoded.json()["error"]["reason"]) == (400, "consultation-decline-code")
    declined = await s.move(s.c, cid, "decline", decline_code="no-capacity", reason="超声科本周无法安排")
    assert declined.json()["state"] == "declined"
    assert declined.json()["decline_code"] == "no-capacity"
    assert declined.json()["clocks"][0]["stopped"] is True


async def test_clock_breach_fires_once_and_not_again_after_a_restart(scene: Scene) -> None:
    s = scene
    runtime = s.exchange.services["teleconsult"].runtime
    servicer: TeleconsultationsServicer = shared_workflow.attached(runtime)
    created = await s.request(kind="pathology", urgency="urgent", question="术中冰冻切片")
    cid = created["consultation_id"]
    due = datetime.datetime.fromisoformat(created["clocks"][0]["due"])
    later = due + datetime.timedelta(minutes=1)
    original = servicer.engine.now
    try:
        servicer.engine.now = lambda: later
        assert await servicer.scanner.scan_once() >= 1
        assert await servicer.scanner.scan_once() == 0
        # A restart: a new servicer over the same database and the same controllable time.
        restarted = TeleconsultationsServicer(runtime)
        restarted.engine.now = lambda: later + datetime.timedelta(hours=1)
        assert await restarted.scanner.scan_once() == 0
    finally:
        servicer.engine.now = original
    got = await s.q.call("GET", f"/api/v1/consultations/{cid}", purpose="consultation")
    assert got.json()["clocks"][0]["fired"] is True
    overdue = await s.c.call("GET", "/api/v1/consultations", params={"box": "incoming", "overdue": "true"})
    assert cid in [c["consultation_id"] for c in overdue.json()["consultations"]]
    assert len(await _breach_or_move_events(s.exchange, "consultation.deadline-breach", cid)) == 1
    # The authority's regional statistics count it against the consulting organisation.
    authority = await s.exchange.member(type="authority", scopes="system/AuditEvent.rs")
    try:
        stats = await authority.call(
            "GET", "/api/v1/consultation-statistics", params={"organization_id": s.c_org}, purpose="audit"
        )
        assert stats.status_code == 200, stats.text
        rows = [r for r in stats.json()["by_organization_month"] if r["organization_id"] == s.c_org]
        assert sum(r["breaches"] for r in rows) == 1
        assert stats.json()["by_kind_mode"] == {"pathology/asynchronous": 1}
    finally:
        await authority.aclose()
    other = await s.q.call("GET", "/api/v1/consultation-statistics", params={"organization_id": s.c_org})
    assert (other.status_code, other.json()["error"]["reason"]) == (403, "consultation-statistics")


async def _breach_or_move_events(exchange: Exchange, subtype: str, cid: str) -> list[dict]:
    """The authority's AuditEvents of one type about one consultation."""
    await exchange.audit_settled()
    authority = await exchange.member(type="authority", scopes="system/AuditEvent.rs")
    try:
        found = await authority.call("GET", "/fhir/R4/AuditEvent", params={"subtype": subtype}, purpose="audit")
        assert found.status_code == 200, found.text
        return [
            e
            for e in (x["resource"] for x in found.json().get("entry", []))
            if any(ent.get("what", {}).get("reference") == f"ServiceRequest/{cid}" for ent in e.get("entity", []))
        ]
    finally:
        await authority.aclose()


async def test_fhir_view_and_one_audited_trace_per_move(scene: Scene) -> None:
    s = scene
    created = await s.request(
        imaging_studies=[
            {
                "study_instance_uid": STUDY_UID,
                "wado_rs_url": f"https://pacs.q.example/wado-rs/studies/{STUDY_UID}",
                "document_id": s.study_doc_id,
            }
        ],
        urgency="urgent",
        invited_practitioner_id=RADIOLOGIST.id,
    )
    cid = created["consultation_id"]
    await s.consent(cid)
    trace_ids = {}
    for who, move, body in (
        (s.c, "accept", {}),
        (s.c, "start-review", {}),
        (s.c, "request-information", {"text": "请补充增强 CT"}),
    ):
        trace_id = secrets.token_hex(16)
        r = await who.call(
            "POST",
            f"/api/v1/consultations/{cid}/{move}",
            purpose="consultation",
            json=body,
            traceparent=f"00-{trace_id}-{secrets.token_hex(8)}-01",
        )
        assert r.status_code == 200, r.text
        trace_ids[move] = trace_id
    fhir = {"Accept": "application/fhir+json"}
    sr = (await s.q.call("GET", f"/fhir/R4/ServiceRequest/{cid}", purpose="consultation", headers=fhir)).json()
    assert sr["priority"] == "urgent"
    assert sr["reasonCode"] == [{"text": "右肺上叶结节性质待定"}]
    assert any(i.get("identifier", {}).get("value") == f"urn:oid:{STUDY_UID}" for i in sr["supportingInfo"])
    t = (await s.c.call("GET", f"/fhir/R4/Task/{cid}", purpose="consultation", headers=fhir)).json()
    assert (t["status"], t["businessStatus"]["coding"][0]["code"]) == ("on-hold", "information-requested")
    incoming = await s.c.call("GET", "/fhir/R4/Task", params={"owner": f"Organization/{s.c_org}"}, headers=fhir)
    assert cid in [e["resource"]["id"] for e in incoming.json()["entry"]]
    thread = await s.q.call(
        "GET", "/fhir/R4/Communication", params={"based-on": f"ServiceRequest/{cid}"}, purpose="consultation"
    )
    assert [e["resource"]["payload"][0]["contentString"] for e in thread.json()["entry"]] == ["请补充增强 CT"]
    assert (await s.move(s.q, cid, "provide-information", text="增强 CT 已上传")).status_code == 200
    assert (await s.sign(cid, {"impression": "良性结节可能大"})).status_code == 200
    reports = await s.q.call(
        "GET", "/fhir/R4/DiagnosticReport", params={"based-on": f"ServiceRequest/{cid}"}, purpose="consultation"
    )
    modes = [(e["resource"]["resourceType"], e["search"]["mode"]) for e in reports.json()["entry"]]
    assert modes == [("DiagnosticReport", "match"), ("Provenance", "include")]
    provenance = reports.json()["entry"][1]["resource"]
    assert provenance["signature"][0]["sigFormat"] == "application/jose"
    assert provenance["target"] == [{"reference": f"DiagnosticReport/{cid}-v1"}]
    done = (await s.q.call("GET", f"/fhir/R4/Task/{cid}", purpose="consultation")).json()
    assert done["status"] == "completed"
    assert done["output"][0]["valueReference"]["reference"] == f"DiagnosticReport/{cid}-v1"
    statement = (await s.q.http.get(f"{s.exchange.base_url}/fhir/R4/metadata")).json()
    served = {r["type"] for r in statement["rest"][0]["resource"]}
    assert {
        "ServiceRequest",
        "Task",
        "Appointment",
        "Schedule",
        "Slot",
        "Communication",
        "DiagnosticReport",
        "Provenance",
    } <= served
    # Every move is one audit event, carrying the trace it was made in.
    for move, trace_id in trace_ids.items():
        events = await _breach_or_move_events(s.exchange, f"consultation.{move}", cid)
        assert len(events) == 1, move
        traces = [x.get("valueString") for x in events[0].get("extension", []) if x["url"] == "urn:hie:trace-id"]
        assert traces == [trace_id], move


async def test_interactive_schedule_and_slot_view(scene: Scene) -> None:
    s = scene
    start = datetime.datetime.now(datetime.UTC).replace(microsecond=0) + datetime.timedelta(days=2)
    published = await s.c.call(
        "POST",
        "/api/v1/consultation-slots",
        as_user=ADMIN,
        json={
            "slots": [
                {
                    "practitioner_id": RADIOLOGIST.id,
                    "start": start.isoformat(),
                    "end": (start + datetime.timedelta(minutes=20)).isoformat(),
                }
            ]
        },
    )
    slot_id = published.json()["slots"][0]["slot_id"]
    created = await s.request(mode="interactive", invited_practitioner_id=RADIOLOGIST.id)
    cid = created["consultation_id"]
    await s.consent(cid)
    assert (await s.move(s.c, cid, "accept")).status_code == 200
    refused = await s.move(s.c, cid, "start-review")
    assert (refused.status_code, refused.json()["error"]["reason"]) == (422, "consultation-mode")
    scheduled = await s.move(s.c, cid, "schedule", slot_ids=[slot_id])
    assert scheduled.status_code == 200, scheduled.text
    schedules = await s.q.call("GET", "/fhir/R4/Schedule", params={"actor": f"Organization/{s.c_org}"})
    assert f"{s.c_org}.{RADIOLOGIST.id}" in [e["resource"]["id"] for e in schedules.json()["entry"]]
    slots = await s.q.call("GET", "/fhir/R4/Slot", params={"schedule": f"Schedule/{s.c_org}.{RADIOLOGIST.id}"})
    assert [(e["resource"]["id"], e["resource"]["status"]) for e in slots.json()["entry"]] == [(slot_id, "busy")]
    appointment = (await s.q.call("GET", f"/fhir/R4/Appointment/{cid}", purpose="consultation")).json()
    assert appointment["status"] == "booked"
    assert appointment["slot"] == [{"reference": f"Slot/{slot_id}"}]
    missing = await s.q.call("GET", "/fhir/R4/Appointment/nope", purpose="consultation")
    assert missing.status_code == 404
    assert missing.json()["resourceType"] == "OperationOutcome"


async def test_the_requester_is_notified_of_the_report_and_its_amendment(scene: Scene) -> None:
    s = scene
    receiver = Receiver()
    await receiver.start()
    try:
        subscribed = await s.q.call(
            "POST",
            "/api/v1/subscriptions",
            json={
                "topic": "workflow-state",
                "endpoint_url": receiver.url,
                "expires": (datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)).isoformat(),
            },
        )
        assert subscribed.status_code == 201, subscribed.text
        cid = (await s.request(invited_practitioner_id=RADIOLOGIST.id))["consultation_id"]
        await s.consent(cid)
        for move in ("accept", "start-review"):
            assert (await s.move(s.c, cid, move)).status_code == 200
        assert (await s.sign(cid, {"impression": "陈旧性病灶"})).status_code == 200
        assert (await s.sign(cid, {"impression": "陈旧性结核灶"}, amend=True)).status_code == 200
        await s.exchange.audit_settled()
        notices = [json.loads(body) for _headers, body, _status in receiver.acknowledged()]
        # Delivery is at least once (a slow acknowledgement is retried with the same event id, which
        # receivers deduplicate on): one notice per move of the consultant, in any order.
        mine = list({n["event_id"]: n for n in notices if n["resource"]["id"] == cid}.values())
        assert sorted(n["event_type"] for n in mine) == [
            "consultation.accept",
            "consultation.amend",
            "consultation.sign",
            "consultation.start-review",
        ]
        amended = next(n for n in mine if n["event_type"] == "consultation.amend")
        assert amended["resource"] == {"type": "ServiceRequest", "id": cid, "status": "report-amended"}
        assert "陈旧性" not in json.dumps(notices, ensure_ascii=False)  # ids and status only
    finally:
        await receiver.stop()


async def test_the_consultants_grant_ends_when_the_consultation_closes(
    tmp_path: Path, keys_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closing ends the grant at close + the region's grace; with no grace, at once (an exchange
    of its own: the grace is the consent service's setting)."""
    monkeypatch.setenv("HIE_CONSENT_GRANT_GRACE_SECONDS", "0")
    exchange, gateway = await start_exchange(base_settings(tmp_path, keys_dir, "sqlite"), "sqlite")
    try:
        q = await exchange.member(scopes=SCOPES, name="城南社区卫生服务中心")
        c = await exchange.member(scopes=SCOPES, name="市中心医院")
        q.practitioner, c.practitioner = GP, RADIOLOGIST
        patient = person("钱十六")
        assert (await q.call("POST", "/api/v1/patients", json={"local_id": "G-1", **patient})).status_code == 201
        summary = await q.call("POST", "/api/v1/documents", json=document("G-1", "门诊病历".encode()))
        summary_id = summary.json()["document_id"]
        await _specialist(c, RADIOLOGIST, ["imaging"])
        s = Scene(exchange, q, c, "G-1", summary_id, summary_id, "")
        cid = (await s.request(invited_practitioner_id=RADIOLOGIST.id))["consultation_id"]

        async def consultant_reads() -> int:
            await exchange.audit_settled()
            return (await c.call("GET", f"/api/v1/documents/{summary_id}/content", purpose="consultation")).status_code

        assert await consultant_reads() == 403
        await s.consent(cid)
        assert (await s.move(c, cid, "accept")).status_code == 200
        assert await consultant_reads() == 200
        assert (await s.move(c, cid, "start-review")).status_code == 200
        assert (await s.sign(cid, {"impression": "未见异常"})).status_code == 200
        assert await consultant_reads() == 200  # open until the requester closes
        assert (await s.move(q, cid, "close")).status_code == 200
        assert await consultant_reads() == 403
        for member in (q, c):
            await member.aclose()
    finally:
        await gateway.stop()
        for service in exchange.services.values():
            await service.stop(grace=None)


async def test_concurrent_moves_one_wins(scene: Scene) -> None:
    """Two doctors of the consultant answer at once, one accepting, one declining: one move wins,
    the other is refused naming the state it lost to; the history holds exactly the winner."""
    s = scene
    for _ in range(3):
        cid = (await s.request(invited_practitioner_id=RADIOLOGIST.id))["consultation_id"]
        await s.consent(cid)
        accept, decline = await asyncio.gather(
            s.move(s.c, cid, "accept"), s.move(s.c, cid, "decline", decline_code="no-capacity", as_user=CARDIOLOGIST)
        )
        assert sorted([accept.status_code, decline.status_code]) == [200, 422], (accept.text, decline.text)
        loser = accept if accept.status_code == 422 else decline
        assert loser.json()["error"]["reason"] == "consultation-state"
        final = (await s.q.call("GET", f"/api/v1/consultations/{cid}", purpose="consultation")).json()
        moves = [h["move"] for h in final["history"]]
        assert moves in (["record-consent", "accept"], ["record-consent", "decline"])


async def test_keyed_request_and_moves_answer_their_first_response(scene: Scene) -> None:
    """Idempotency-Key on a consultation's writes (services/shared/idempotency.py): a retry gets
    the first answer byte for byte (audit event ids included) and changes nothing; the same key
    with another request or move is 409 idempotency-key-reused."""
    s = scene
    body = {
        "patient_local_id": s.local_id,
        "consultant_organization_id": s.c_org,
        "kind": "imaging",
        "question": "右肺上叶结节性质待定",
        "document_ids": [s.summary_id],
    }
    key = {"Idempotency-Key": f"req-{secrets.token_hex(4)}"}
    first = await s.q.call("POST", "/api/v1/consultations", purpose="consultation", json=body, headers=key)
    again = await s.q.call("POST", "/api/v1/consultations", purpose="consultation", json=body, headers=key)
    assert (first.status_code, again.status_code) == (201, 201), again.text
    assert again.content == first.content
    other = await s.q.call(
        "POST", "/api/v1/consultations", purpose="consultation", json={**body, "question": "另一个问题"}, headers=key
    )
    assert (other.status_code, other.json()["error"]["reason"]) == (409, "idempotency-key-reused")
    cid = first.json()["consultation_id"]
    consent = {"informed_consent": {"evidence_document_id": s.consent_form_id, "signer": "patient"}}
    move_key = {"Idempotency-Key": f"mv-{secrets.token_hex(4)}"}
    moves = [
        await s.q.call(
            "POST",
            f"/api/v1/consultations/{cid}/record-consent",
            purpose="consultation",
            json=consent,
            headers=move_key,
        )
        for _ in range(2)
    ]
    assert moves[0].status_code == 200, moves[0].text
    assert moves[1].content == moves[0].content
    assert len(moves[0].json()["audit_event_ids"]) == 1
    reused = await s.q.call(
        "POST", f"/api/v1/consultations/{cid}/cancel", purpose="consultation", json={}, headers=move_key
    )
    assert (reused.status_code, reused.json()["error"]["reason"]) == (409, "idempotency-key-reused")
    assert len(await _breach_or_move_events(s.exchange, "consultation.record-consent", cid)) == 1
    got = await s.q.call("GET", f"/api/v1/consultations/{cid}", purpose="consultation")
    assert got.json()["state"] == "requested"
