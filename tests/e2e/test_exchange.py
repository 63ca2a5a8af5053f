"""The demo's exchange, asserted step by step, over real HTTP and real gRPC servers."""

from __future__ import annotations

import base64
import hashlib
import secrets

import pytest

from gateway.client import Practitioner, new_traceparent
from services.ops.demo import DEMO_NATIONAL_ID, discharge_summary_cda, run_demo
from services.shared import gb11643
from tests.conftest import Exchange
from tests.support.factories import document, person

PATIENT = {
    "name": "张三",
    "family": "张",
    "given": "三",
    "gender": "female",
    "birth_date": "1949-12-31",
    "national_id": DEMO_NATIONAL_ID,
    "phones": ["13800138000"],
    "address": {"province": "北京市", "city": "北京市", "district": "西城区", "line": "金融街 1 号"},
}


async def test_demo_runs_against_the_exchange(exchange: Exchange) -> None:
    report = await run_demo(exchange.settings, exchange.base_url, echo=False)
    assert [s.response.status_code for s in report.steps] == [
        200,
        200,
        200,
        200,
        201,
        201,
        201,
        200,
        200,
        200,
        # The remote consultation: study, consent form, directory, request, consent, accept,
        # review, draft, sign, report read, published keys, filed record, close.
        201,
        201,
        200,
        201,
        *[200] * 9,
    ]
    assert any("signs the report with its own key" in s.title for s in report.steps)


async def test_exchange_between_two_hospitals(exchange: Exchange, spans) -> None:  # type: ignore[no-untyped-def]
    a = await exchange.member(name="市第一人民医院")
    b = await exchange.member(name="城东社区卫生服务中心")
    auditor = await exchange.member(type="authority", scopes="system/AuditEvent.rs", name="市卫健委")
    patient = {**PATIENT, **person("张三")}
    national_id = patient["national_id"]

    at_a = await a.call("POST", "/api/v1/patients", json={"local_id": "A-1", **patient})
    assert at_a.status_code == 201, at_a.text
    assert at_a.json()["link_method"] == "new"
    # The national id is masked in responses.
    assert {"type": "NNCHN", "value": gb11643.mask(national_id)} in [
        {"type": i["type"], "value": i["value"]} for i in at_a.json()["identifiers"]
    ]
    assert national_id not in at_a.text
    at_b = await b.call("POST", "/api/v1/patients", json={"local_id": "B-1", **patient})
    assert at_b.status_code == 201
    assert at_b.json()["link_method"] == "national-id"
    eid = at_a.json()["enterprise_id"]
    assert at_b.json()["enterprise_id"] == eid
    # Registering again is idempotent: same person, 200, nothing new.
    again = await b.call("POST", "/api/v1/patients", json={"local_id": "B-1", **patient})
    assert again.status_code == 200
    assert again.json()["enterprise_id"] == eid

    xref = await b.call("GET", "/api/v1/patients/B-1/cross-references")
    assert xref.status_code == 200
    assert {(i["domain"], i["local_id"]) for i in xref.json()["identities"]} == {
        (a.org_id, "A-1"),  # type: ignore[attr-defined]
        (b.org_id, "B-1"),  # type: ignore[attr-defined]
    }

    content = discharge_summary_cda("张三")
    registered = await a.call("POST", "/api/v1/documents", json=document("A-1", content))
    assert registered.status_code == 201, registered.text
    document_id = registered.json()["document_id"]
    assert registered.json()["enterprise_id"] == eid

    trace_id = secrets.token_hex(16)
    spans.clear()
    found = await b.call(
        "GET", "/api/v1/documents", params={"patient_local_id": "B-1"}, traceparent=new_traceparent(trace_id)
    )
    assert found.status_code == 200
    assert found.headers["x-trace-id"] == trace_id
    assert [e["document_id"] for e in found.json()["entries"]] == [document_id]
    assert found.json()["entries"][0]["type"]["display"] == "出院小结"

    retrieved = await b.call("GET", f"/api/v1/documents/{document_id}/content", traceparent=new_traceparent(trace_id))
    assert retrieved.status_code == 200
    assert retrieved.content == content
    assert retrieved.headers["content-type"].startswith("text/xml")
    assert (
        retrieved.headers["repr-digest"] == f"sha-256=:{base64.b64encode(hashlib.sha256(content).digest()).decode()}:"
    )
    assert retrieved.headers["x-trace-id"] == trace_id

    await exchange.audit_settled()
    # One trace: the gateway and every service the exchange touched, audit included. The audit
    # relay sends a batch of many requests' events in one append: its span continues one of their
    # traces and links to the others, so the exchange's trace leads to its audit delivery.
    finished = spans.get_finished_spans()
    traces = {int(trace_id, 16)} | {
        sp.context.trace_id
        for sp in finished
        if sp.name == "audit.relay" and any(link.context.trace_id == int(trace_id, 16) for link in sp.links)
    }
    names = {s.name for s in finished if s.context.trace_id in traces}
    for expected in (
        "GET /api/v1/documents",
        "GET /api/v1/documents/{document_id}/content",
        "/hie.registry.v1.DocumentRegistry/FindDocuments",
        "/hie.registry.v1.DocumentRegistry/RetrieveDocumentStream",
        "/hie.mpi.v1.PatientIndex/CrossReference",
        "/hie.consent.v1.ConsentDecisionPoint/Decide",
        "/hie.audit.v1.AuditLog/Append",
    ):
        assert expected in names, f"{expected} not in trace: {sorted(names)}"
    # Service spans name who asked and why (organisation, role, purpose), never the patient.
    retrieve_server = next(
        sp
        for sp in spans.get_finished_spans()
        if sp.name == "/hie.registry.v1.DocumentRegistry/RetrieveDocumentStream"
        and sp.attributes.get("hie.organization_id")
    )
    assert retrieve_server.attributes["hie.organization_id"] == b.org_id  # type: ignore[attr-defined]
    assert retrieve_server.attributes["hie.purpose_of_use"] == "treatment"
    assert retrieve_server.attributes["hie.role"] == "doctor"
    # Database spans of the services the exchange touched, inside the same trace.
    db_spans = [
        sp
        for sp in spans.get_finished_spans()
        if sp.context.trace_id in traces and (sp.attributes or {}).get("db.system")
    ]
    assert {sp.attributes["db.name"].split("_")[-1] for sp in db_spans} >= {"registry", "mpi", "audit"}

    # The audit records of the exchange carry its trace id.
    listed = await auditor.call("GET", "/api/v1/audit/events", params={"trace_id": trace_id}, purpose="audit")
    assert listed.status_code == 200
    events = listed.json()["events"]
    by_type = {e["type"]: e for e in events}
    # Exactly one record per operation: identity lookups inside them are not separate events.
    assert sorted(e["type"] for e in events) == ["document.query", "document.retrieve"]
    assert all(e["trace_id"] == trace_id for e in events)
    assert by_type["document.retrieve"]["organization_id"] == b.org_id  # type: ignore[attr-defined]
    assert by_type["document.retrieve"]["patient_enterprise_id"] == eid
    # A read of another organisation's document names its source (registrations-then-reads report).
    assert by_type["document.retrieve"]["entities"] == [
        {"type": "DocumentReference", "id": document_id},
        {"type": "Organization", "id": a.org_id},  # type: ignore[attr-defined]
    ]
    assert by_type["document.retrieve"]["event_id"] == retrieved.headers["x-hie-audit-event-id"]
    assert by_type["document.query"]["event_id"] in found.json()["audit_event_ids"]
    # A hospital sees only its own requests' records.
    own = await a.call(
        "GET",
        "/api/v1/audit/events",
        params={"trace_id": trace_id},
        purpose="audit",
        as_user=Practitioner(id="A-ADM", name="信息科", role="admin", department="信息科"),
    )
    assert own.status_code == 200
    assert own.json()["events"] == []
    # ...but a patient access report for its own patient shows who else read the person's records.
    report = await a.call(
        "GET",
        "/api/v1/audit/events",
        params={"patient_local_id": "A-1"},
        purpose="audit",
        as_user=Practitioner(id="A-AUD", name="质控科", role="auditor", department="质控科"),
    )
    assert report.status_code == 200
    readers = {(e["organization_id"], e["type"]) for e in report.json()["events"]}
    assert (b.org_id, "document.retrieve") in readers  # type: ignore[attr-defined]
    assert all(e["patient_enterprise_id"] == eid for e in report.json()["events"])
    # The auditor's own search is on the record too.
    await exchange.audit_settled()
    searches = await auditor.call(
        "GET",
        "/api/v1/audit/events",
        params={"type": "audit.query", "organization_id": auditor.org_id},
        purpose="audit",
    )  # type: ignore[attr-defined]
    assert any(
        e["organization_id"] == auditor.org_id and e["type"] == "audit.query"  # type: ignore[attr-defined]
        for e in searches.json()["events"]
    )
    for member in (a, b, auditor):
        await member.aclose()


async def test_chinese_names_round_trip_utf8(exchange: Exchange) -> None:
    a = await exchange.member()
    body = {
        "local_id": "U-1",
        "name": "欧阳娜娜",
        "family": "欧阳",
        "given": "娜娜",
        "gender": "female",
        "address": {"province": "广东省", "city": "深圳市", "district": "南山区", "line": "科技园路 8 号"},
    }
    created = await a.call("POST", "/api/v1/patients", json=body)
    assert created.status_code == 201
    assert created.json()["name"] == "欧阳娜娜"
    assert created.json()["family"] == "欧阳"
    assert created.json()["address"]["line"] == "科技园路 8 号"
    await a.aclose()


@pytest.mark.parametrize("national_id", ["11010519491231002X"])
def test_demo_national_id_is_valid(national_id: str) -> None:
    assert gb11643.normalize(national_id) == national_id
