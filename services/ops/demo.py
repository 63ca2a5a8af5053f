"""`hie demo`: one real exchange between two hospitals, through a running exchange.

Hospital A (a tertiary hospital) and hospital B (a community health centre) register the
same person under their own local ids; A registers a discharge summary; B, treating the
patient, finds and retrieves it in one traced exchange; the regional authority reads the
audit records of that exchange.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

import httpx

from gateway.client import HospitalClient, Practitioner, new_traceparent
from gateway.console.demo import print_console_sign_in
from gateway.organizations import add_keys, find_organization, register_organization, set_tier
from services.ops.demo_teleconsult import consultation_steps
from services.shared.config import Settings
from services.shared.keys import generate_ec_key, jwks, load_private_key, public_jwk, write_private_key

# A synthetic resident id with a valid GB 11643 check digit (not a real person's).
DEMO_NATIONAL_ID = "11010519491231002X"
DISCHARGE_SUMMARY_LOINC = "18842-5"


class DemoFailed(Exception):
    pass


# What an audit event type means, in an auditor's words.
_WHAT = {
    "patient.register": "registered a patient record",
    "patient.update": "updated a patient record",
    "document.register": "registered a document",
    "document.query": "searched the region's documents of the patient",
    "document.retrieve": "read a document's content",
}
# Reads of clinical data ask consent first: a recorded success is a permit; a minor failure on a
# read is the exchange refusing it (consent or scope), which the denied-access report lists.
_CONSENT = {"success": "permitted", "minor-failure": "denied"}


def mask_name(name: str) -> str:
    """The family name and one * per other character (张三 → 张*), as the masking policy shows a
    patient's name to roles that may not see it in full."""
    return name[:1] + "*" * (len(name) - 1)


def auditor_lines(
    event: dict[str, Any], *, org_names: dict[str, str], patient_name: str, document_titles: dict[str, str]
) -> list[str]:
    """One audit record as an auditor reads it: when, who (practitioner, role, organisation), for
    what purpose, which patient (masked), what was done, the consent decision and the trace."""
    when = event["occurred"][:19].replace("T", " ") + " UTC"
    org = event["organization_id"]
    eid = event["patient_enterprise_id"]
    entities = ", ".join(
        f"{document_titles.get(e['id'], e['type'])} ({e['id'][:8]}…)" for e in event.get("entities", [])
    )
    what = _WHAT.get(event["type"], event["type"]) + (f": {entities}" if entities else "")
    reads = event["action"] in {"read", "execute"} and event["type"].startswith(("document.", "patient.query"))
    consent = _CONSENT.get(event["outcome"], event["outcome"]) if reads else "not asked (a write by the owner)"
    return [
        f"#{event['sequence']}  {when}  ({event['type']}, outcome {event['outcome']})",
        f"    who:      {event['practitioner_name']} ({event['practitioner_id']}), {event['role']},"
        f" {org_names.get(org, org)} ({org})",
        f"    purpose:  {event['purpose_of_use']}",
        f"    patient:  {mask_name(patient_name)} (enterprise id {eid[:4]}…{eid[-4:]})" if eid else "    patient:  —",
        f"    what:     {what}",
        f"    consent:  {consent}",
        f"    trace:    {event['trace_id']} (recorded by {event['source_service']}, chain hash {event['hash'][:12]}…)",
    ]


def discharge_summary_cda(patient_name: str) -> bytes:
    """A small CDA R2 discharge summary with Chinese narrative."""
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<ClinicalDocument xmlns="urn:hl7-org:v3">
  <typeId root="2.16.840.1.113883.1.3" extension="POCD_HD000040"/>
  <code code="{DISCHARGE_SUMMARY_LOINC}" codeSystem="2.16.840.1.113883.6.1" displayName="Discharge summary"/>
  <title>出院小结</title>
  <recordTarget><patientRole><patient><name>{patient_name}</name></patient></patientRole></recordTarget>
  <component><structuredBody><component><section>
    <title>出院诊断</title><text>社区获得性肺炎，已好转。</text>
  </section></component><component><section>
    <title>出院医嘱</title><text>阿莫西林 0.5g 口服 每日三次，共七天；一周后社区卫生服务中心复诊。</text>
  </section></component></structuredBody></component>
</ClinicalDocument>
""".encode()


@dataclass
class Step:
    title: str
    response: httpx.Response
    details: dict[str, Any]


class DemoReport:
    def __init__(self, echo: bool) -> None:
        self.echo = echo
        self.steps: list[Step] = []
        # The referral up and back down (referral_round_trip), reported apart.
        self.referral: DemoReport | None = None

    def step(self, title: str, response: httpx.Response, expect: int | set[int], **details: Any) -> dict[str, Any]:
        expected = {expect} if isinstance(expect, int) else expect
        trace = response.headers.get("x-trace-id", "")
        self.steps.append(Step(title, response, details))
        if self.echo:
            print(f"[{response.status_code}] {title}")
            for key, value in {**details, "trace_id": trace}.items():
                if value:
                    print(f"      {key}: {value}")
        if response.status_code not in expected:
            raise DemoFailed(f"{title}: HTTP {response.status_code} {response.text[:300]}")
        return response.json() if response.headers.get("content-type", "").startswith("application/json") else {}


async def _member(
    settings: Settings, base_url: str, *, org_id: str, name: str, type: str, scopes: str
) -> HospitalClient:
    """The demo's member organisation, registered on the first run and reused on later ones: its
    private key is kept (0600) in the data dir's demo/ folder."""
    key_file = settings.data_dir / "demo" / f"{org_id}.key.pem"
    key = load_private_key(key_file) if key_file.exists() else None
    org = await find_organization(settings, org_id)
    if org is None:
        key = key or generate_ec_key()
        write_private_key(key_file, key)
        org = await register_organization(settings, org_id=org_id, name=name, type=type, jwks=jwks(key))
    elif key is None or public_jwk(key)["kid"] not in {k["kid"] for k in org.keys}:
        # Registered by an earlier run whose key was lost: register a new key for it.
        key = generate_ec_key()
        write_private_key(key_file, key)
        await add_keys(settings, org_id=org_id, jwks=jwks(key))
    if org.status != "active":
        raise DemoFailed(f"the demo organisation {org_id} is revoked (`hie org revoke --id {org_id} --reinstate`)")
    client = HospitalClient(base_url=base_url, client_id=org.client_id, key=key, scopes=scopes)
    client.client_org = org_id  # type: ignore[attr-defined]
    return client


async def run_demo(settings: Settings, base_url: str, *, echo: bool = True) -> DemoReport:
    """Run the exchange; raises DemoFailed at the first step that does not answer as expected."""
    report = DemoReport(echo)
    run = secrets.token_hex(3)
    hospital_scopes = "system/Patient.crs system/DocumentReference.crs system/AuditEvent.rs system/ServiceRequest.crus"
    a = await _member(
        settings,
        base_url,
        org_id="demo-hosp-a",
        name="市第一人民医院",
        type="hospital",
        scopes=hospital_scopes,
    )
    b = await _member(
        settings,
        base_url,
        org_id="demo-chc-b",
        name="城东社区卫生服务中心",
        type="hospital",
        scopes=hospital_scopes,
    )
    auditor = await _member(
        settings,
        base_url,
        org_id="demo-authority",
        name="市卫生健康委员会",
        type="authority",
        scopes="system/AuditEvent.rs",
    )
    a.practitioner = Practitioner(id="A-D0042", name="李医生", role="doctor", department="呼吸内科")
    b.practitioner = Practitioner(id="B-D0007", name="王医生", role="doctor", department="全科")
    auditor.practitioner = Practitioner(id="AUD-01", name="陈审计", role="auditor", department="医政医管处")
    try:
        if echo:
            print(f"exchange: {base_url}")
            print(f"hospital A: 市第一人民医院 client_id={a.client_id}")
            print(f"hospital B: 城东社区卫生服务中心 client_id={b.client_id}")
        report.step("SMART configuration", await a.http.get(f"{base_url}/.well-known/smart-configuration"), 200)
        for label, member in (("A", a), ("B", b), ("authority", auditor)):
            token = await member.request_token()
            body = report.step(f"token for {label} (private_key_jwt)", token, 200)
            if echo:
                print(f"      scope: {body.get('scope')}")

        patient = {
            "name": "张三",
            "family": "张",
            "given": "三",
            "gender": "female",
            "birth_date": "1949-12-31",
            "national_id": DEMO_NATIONAL_ID,
            "phones": ["13800138000"],
            "address": {"province": "北京市", "city": "北京市", "district": "西城区", "line": "金融街 1 号"},
        }
        at_a = report.step(
            "A registers the patient (local id A-MRN-0001)",
            await a.call("POST", "/api/v1/patients", json={"local_id": "A-MRN-0001", **patient}),
            {200, 201},
        )
        eid = at_a["enterprise_id"]
        if echo:
            print(f"      enterprise_id: {eid} (link: {at_a['link_method']})")
            print(f"      audit_event_ids: {','.join(at_a['audit_event_ids'])}")
        at_b = report.step(
            "B registers the same person (local id B-7788)",
            await b.call("POST", "/api/v1/patients", json={"local_id": "B-7788", **patient}),
            {200, 201},
        )
        if echo:
            print(f"      enterprise_id: {at_b['enterprise_id']} (link: {at_b['link_method']})")
            print(f"      audit_event_ids: {','.join(at_b['audit_event_ids'])}")
        if at_b["enterprise_id"] != eid:
            raise DemoFailed("B's registration did not link to A's enterprise id")

        content = discharge_summary_cda("张三")
        registered = report.step(
            "A registers a discharge summary (出院小结)",
            await a.call(
                "POST",
                "/api/v1/documents",
                json={
                    "source_document_id": f"A-DS-{run}",
                    "patient_local_id": "A-MRN-0001",
                    "type": {
                        "system": "http://loinc.org",
                        "code": DISCHARGE_SUMMARY_LOINC,
                        "display": "出院小结",
                    },
                    "title": "出院小结 — 呼吸内科",
                    "mime_type": "text/xml",
                    "sha256": hashlib.sha256(content).hexdigest(),
                    "size": len(content),
                    "content_base64": base64.b64encode(content).decode(),
                },
            ),
            201,
        )
        document_id = registered["document_id"]
        if echo:
            print(f"      document_id: {document_id}  sha256: {registered['sha256'][:16]}…")
            print(f"      audit_event_ids: {','.join(registered['audit_event_ids'])}")

        # B's system starts one trace for the whole exchange: find, then retrieve.
        trace_id = secrets.token_hex(16)
        found = report.step(
            "B finds the patient's documents across the region",
            await b.call(
                "GET",
                "/api/v1/documents",
                params={"patient_local_id": "B-7788"},
                traceparent=new_traceparent(trace_id),
            ),
            200,
        )
        ids = [e["document_id"] for e in found["entries"]]
        if echo:
            print(f"      found: {ids}  audit_event_ids: {','.join(found['audit_event_ids'])}")
        if document_id not in ids:
            raise DemoFailed("B did not find A's discharge summary")
        retrieved = await b.call(
            "GET", f"/api/v1/documents/{document_id}/content", traceparent=new_traceparent(trace_id)
        )
        report.step(
            "B retrieves the discharge summary",
            retrieved,
            200,
            audit_event_ids=retrieved.headers.get("x-hie-audit-event-id", ""),
        )
        if hashlib.sha256(retrieved.content).hexdigest() != registered["sha256"]:
            raise DemoFailed("retrieved content does not match the registered hash")
        if echo:
            print(
                f"      content verified: {len(retrieved.content)} bytes,"
                f" Repr-Digest {retrieved.headers.get('repr-digest')}"
            )
            print(f"      exchange trace id: {trace_id}")

        events: list[dict[str, Any]] = []
        # The audit relay delivers within a second or so; a loaded machine may take longer.
        for _ in range(300):
            listed = await auditor.call("GET", "/api/v1/audit/events", params={"trace_id": trace_id}, purpose="audit")
            events = listed.json().get("events", []) if listed.status_code == 200 else []
            if {"document.query", "document.retrieve"} <= {e["type"] for e in events}:
                break
            await asyncio.sleep(0.1)
        report.step("authority reads the exchange's audit trail", listed, 200)
        if echo:
            names = {
                "demo-hosp-a": "市第一人民医院",
                "demo-chc-b": "城东社区卫生服务中心",
                "demo-authority": "市卫生健康委员会",
            }
            titles = {document_id: "出院小结 — 呼吸内科"}
            for event in events:
                for line in auditor_lines(event, org_names=names, patient_name="张三", document_titles=titles):
                    print(f"      {line}")
        if not {"document.query", "document.retrieve"} <= {e["type"] for e in events}:
            raise DemoFailed("the exchange's audit records did not arrive")
        report.referral = await referral_round_trip(settings, a, b, echo=echo)
        # The remote consultation: B asks A to read a chest CT (ids of this run: the organisations are reused).
        a.org_id = a.client_org  # type: ignore[attr-defined]
        await consultation_steps(report, requester=b, consultant=a, patient_local_id="B-7788", run=run)
        if echo:
            print(f"      both records carry trace {trace_id}: one exchange, B's search and its read")
            print("demo exchange completed")
            await print_console_sign_in(settings, base_url, authority_org_id="demo-authority")
        return report
    finally:
        for member in (a, b, auditor):
            await member.aclose()


async def referral_round_trip(
    settings: Settings, tertiary: HospitalClient, community: HospitalClient, *, echo: bool = True
) -> DemoReport:
    """双向转诊 after the record exchange: the community centre refers the patient up to the
    tertiary hospital with a slot, the hospital sees the patient and returns the outcome, then
    refers the patient back down with a care plan the community follows up; the episode closes."""
    report = DemoReport(echo)
    t_org = tertiary.client_org  # type: ignore[attr-defined]
    c_org = community.client_org  # type: ignore[attr-defined]
    await set_tier(settings, org_id=t_org, tier="tertiary")
    await set_tier(settings, org_id=c_org, tier="community")
    if echo:
        print("two-way referral (双向转诊)")
    start = datetime.datetime.now(datetime.UTC).replace(microsecond=0) + datetime.timedelta(days=1)
    slots = report.step(
        "A publishes a 呼吸内科 slot",
        await tertiary.call(
            "POST",
            "/api/v1/referral-slots",
            json={
                "slots": [
                    {
                        "department": "呼吸内科",
                        "start": start.isoformat(),
                        "end": (start + datetime.timedelta(minutes=30)).isoformat(),
                    }
                ]
            },
        ),
        201,
    )
    slot_id = slots["slots"][0]["slot_id"]

    async def move(client: HospitalClient, referral_id: str, name: str, expect: int = 200, **body: Any) -> Any:
        return report.step(
            f"{'A' if client is tertiary else 'B'} {name}",
            await client.call("POST", f"/api/v1/referrals/{referral_id}/{name}", json=body, purpose="referral"),
            expect,
        )

    up = report.step(
        "B refers the patient up to A (urgent, J18.9, slot booked)",
        await community.call(
            "POST",
            "/api/v1/referrals",
            json={
                "patient_local_id": "B-7788",
                "target_organization_id": t_org,
                "reason": "发热咳嗽一周，抗感染治疗效果不佳",
                "diagnosis": {"code": "J18.9", "text": "肺炎"},
                "urgency": "urgent",
                "target_department": "呼吸内科",
                "book_slot_id": slot_id,
            },
            purpose="referral",
        ),
        201,
    )
    up_id = up["referral_id"]
    if echo:
        print(f"      referral_number: {up['referral_number']}  direction: {up['direction']}")
    await move(tertiary, up_id, "accept", reason="同意接收")
    await move(tertiary, up_id, "schedule", slot_id=slot_id)
    await move(tertiary, up_id, "arrive")
    note = report.step(
        "A registers the consultation note",
        await tertiary.call(
            "POST",
            "/api/v1/documents",
            json=_text_document("A-MRN-0001", "会诊记录：社区获得性肺炎，已调整抗感染方案"),
        ),
        201,
    )
    await move(tertiary, up_id, "complete", outcome_document_id=note["document_id"])
    closed = await move(community, up_id, "acknowledge", reason="已阅结果")
    due = start + datetime.timedelta(days=14)
    down = report.step(
        "A refers the patient back down with a care plan",
        await tertiary.call(
            "POST",
            "/api/v1/referrals",
            json={
                "patient_local_id": "A-MRN-0001",
                "target_organization_id": c_org,
                "parent_referral_id": up_id,
                "reason": "病情好转，转回社区继续治疗",
                "diagnosis": {"code": "J18.9", "text": "肺炎（恢复期）"},
                "service": "rehabilitation",
                "care_plan": {
                    "follow_ups": [{"description": "两周后复查胸片", "due": due.isoformat()}],
                    "medication": "阿莫西林克拉维酸钾 口服 7天",
                    "warning_signs": "再次高热或呼吸困难立即就诊",
                },
            },
            purpose="referral",
        ),
        201,
    )
    down_id = down["referral_id"]
    await move(community, down_id, "accept", reason="已接收康复计划")
    follow_up = down["care_plan"]["follow_ups"][0]["follow_up_id"]
    report.step(
        "B does the first follow-up",
        await community.call(
            "POST",
            f"/api/v1/referrals/{down_id}/follow-ups/{follow_up}/complete",
            json={"note": "胸片示炎症吸收"},
            purpose="referral",
        ),
        200,
    )
    visit = report.step(
        "B registers the follow-up note",
        await community.call("POST", "/api/v1/documents", json=_text_document("B-7788", "随访记录：恢复良好")),
        201,
    )
    await move(community, down_id, "complete", outcome_document_id=visit["document_id"])
    await move(tertiary, down_id, "acknowledge")
    episode = report.step(
        "the episode up and back down",
        await community.call("GET", f"/api/v1/referral-episodes/{closed['episode_id']}", purpose="referral"),
        200,
    )
    if episode["status"] != "closed":
        raise DemoFailed("the referral episode did not close")
    if echo:
        print(f"      episode {episode['episode_id']}: {episode['status']}, {len(episode['referrals'])} referrals")
    return report


def _text_document(local_id: str, text: str) -> dict[str, Any]:
    content = text.encode()
    return {
        "source_document_id": f"DEMO-{secrets.token_hex(4)}",
        "patient_local_id": local_id,
        "type": {"system": "http://loinc.org", "code": "11488-4", "display": "会诊记录"},
        "title": text.split("：")[0],
        "mime_type": "text/plain",
        "sha256": hashlib.sha256(content).hexdigest(),
        "size": len(content),
        "content_base64": base64.b64encode(content).decode(),
    }
