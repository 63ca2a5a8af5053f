"""Every audited operation writes exactly one audit record, of the right type, with the right
actor, purpose, patient, outcome and trace id (table-driven across the gateway routes)."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.client import HospitalClient, Practitioner, new_traceparent
from tests.conftest import Exchange
from tests.support.factories import document, person


@dataclass(frozen=True)
class Case:
    name: str
    actor: str  # "a", "b" or "auditor"
    method: str
    path: Callable[[dict[str, Any]], str]
    status: int
    type: str
    action: str
    outcome: str = "success"
    purpose: str = "treatment"
    body: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    params: Callable[[dict[str, Any]], dict[str, str]] | None = None
    keep: Callable[[dict[str, Any], Any], None] | None = None
    patient: bool = True


def _keep(key: str, field: str) -> Callable[[dict[str, Any], Any], None]:
    def keep(ctx: dict[str, Any], response: Any) -> None:
        ctx[key] = response.json()[field]

    return keep


CASES = [
    Case(
        "register patient",
        "a",
        "POST",
        lambda c: "/api/v1/patients",
        201,
        "patient.register",
        "create",
        body=lambda c: {"local_id": "COV-A", **c["person"]},
        keep=_keep("eid", "enterprise_id"),
    ),
    Case(
        "update patient",
        "a",
        "POST",
        lambda c: "/api/v1/patients",
        200,
        "patient.update",
        "update",
        body=lambda c: {"local_id": "COV-A", **c["person"], "phones": ["13700000000"]},
    ),
    Case(
        "link at another hospital",
        "b",
        "POST",
        lambda c: "/api/v1/patients",
        201,
        "patient.register",
        "create",
        body=lambda c: {"local_id": "COV-B", **c["person"]},
    ),
    Case(
        "PIX cross-reference",
        "b",
        "GET",
        lambda c: "/api/v1/patients/COV-B/cross-references",
        200,
        "patient.pix-query",
        "execute",
    ),
    Case(
        "register document",
        "a",
        "POST",
        lambda c: "/api/v1/documents",
        201,
        "document.register",
        "create",
        body=lambda c: document("COV-A", "出院小结：好转出院".encode()),
        keep=_keep("doc", "document_id"),
    ),
    Case(
        "register restricted document",
        "a",
        "POST",
        lambda c: "/api/v1/documents",
        201,
        "document.register",
        "create",
        body=lambda c: document("COV-A", "心理咨询记录".encode(), security_labels=["PSY"]),
        keep=_keep("psy", "document_id"),
    ),
    Case(
        "find documents",
        "b",
        "GET",
        lambda c: "/api/v1/documents",
        200,
        "document.query",
        "execute",
        params=lambda c: {"patient_local_id": "COV-B"},
    ),
    Case(
        "retrieve document",
        "b",
        "GET",
        lambda c: f"/api/v1/documents/{c['doc']}/content",
        200,
        "document.retrieve",
        "read",
    ),
    Case(
        "retrieve denied by consent",
        "b",
        "GET",
        lambda c: f"/api/v1/documents/{c['psy']}/content",
        403,
        "document.retrieve",
        "read",
        outcome="minor-failure",
    ),
    Case(
        "create referral",
        "a",
        "POST",
        lambda c: "/api/v1/referrals",
        201,
        "referral.create",
        "create",
        purpose="referral",
        body=lambda c: {"patient_local_id": "COV-A", "target_organization_id": c["b_org"], "direction": "up"},
        keep=_keep("referral", "referral_id"),
    ),
    Case(
        "read referral",
        "b",
        "GET",
        lambda c: f"/api/v1/referrals/{c['referral']}",
        200,
        "referral.read",
        "read",
        purpose="referral",
    ),
    Case(
        "request consultation",
        "a",
        "POST",
        lambda c: "/api/v1/consultations",
        201,
        "consultation.request",
        "create",
        purpose="consultation",
        body=lambda c: {
            "patient_local_id": "COV-A",
            "consultant_organization_id": c["b_org"],
            "kind": "imaging",
            "question": "肺结节性质？",
        },
        keep=_keep("consultation", "consultation_id"),
    ),
    Case(
        "read consultation",
        "b",
        "GET",
        lambda c: f"/api/v1/consultations/{c['consultation']}",
        200,
        "consultation.read",
        "read",
        purpose="consultation",
    ),
    Case(
        "auditor searches",
        "auditor",
        "GET",
        lambda c: "/api/v1/audit/events",
        200,
        "audit.query",
        "execute",
        purpose="audit",
        params=lambda c: {"organization_id": c["b_org"]},
        patient=False,
    ),
]


async def test_every_audited_operation_writes_exactly_one_record(exchange: Exchange) -> None:
    members: dict[str, HospitalClient] = {
        "a": await exchange.member(name="覆盖测试甲院"),
        "b": await exchange.member(name="覆盖测试乙院"),
        "auditor": await exchange.member(type="authority", scopes="system/AuditEvent.rs", name="卫健委"),
    }
    members["a"].practitioner = Practitioner(id="A-DOC-1", name="甲院医生", role="doctor", department="内科")
    members["b"].practitioner = Practitioner(id="B-DOC-1", name="乙院医生", role="doctor", department="全科")
    ctx: dict[str, Any] = {"person": person("蒋十五"), "b_org": members["b"].org_id}  # type: ignore[attr-defined]
    done: list[tuple[Case, str, HospitalClient]] = []
    for case in CASES:
        trace_id = secrets.token_hex(16)
        client = members[case.actor]
        response = await client.call(
            case.method,
            case.path(ctx),
            purpose=case.purpose,
            traceparent=new_traceparent(trace_id),
            json=case.body(ctx) if case.body else None,
            params=case.params(ctx) if case.params else None,
        )
        assert response.status_code == case.status, (case.name, response.text)
        if case.keep:
            case.keep(ctx, response)
        done.append((case, trace_id, client))

    await exchange.audit_settled()
    auditor = members["auditor"]
    for case, trace_id, client in done:
        listed = await auditor.call("GET", "/api/v1/audit/events", params={"trace_id": trace_id}, purpose="audit")
        events = listed.json()["events"]
        assert len(events) == 1, (case.name, [e["type"] for e in events])
        event = events[0]
        assert event["type"] == case.type, case.name
        assert event["action"] == case.action, case.name
        assert event["outcome"] == case.outcome, case.name
        assert event["organization_id"] == client.org_id, case.name  # type: ignore[attr-defined]
        assert event["practitioner_id"] == client.practitioner.id, case.name
        assert event["practitioner_name"] == client.practitioner.name, case.name
        assert event["role"] == client.practitioner.role, case.name
        assert event["purpose_of_use"] == case.purpose, case.name
        assert event["patient_enterprise_id"] == (ctx["eid"] if case.patient else ""), case.name
        assert event["trace_id"] == trace_id, case.name
        assert event["source_address"] == "127.0.0.1", case.name
    for member in members.values():
        await member.aclose()


async def test_token_issue_and_refusal_are_audited(exchange: Exchange) -> None:
    from gateway.client import client_assertion
    from services.shared.keys import generate_ec_key

    hospital = await exchange.member()
    auditor = await exchange.member(type="authority", scopes="system/AuditEvent.rs")
    assert (await hospital.request_token()).status_code == 200
    rogue = client_assertion(
        key=generate_ec_key(), client_id=hospital.client_id, token_endpoint=await hospital.token_endpoint()
    )
    import httpx

    async with httpx.AsyncClient() as http:
        refused = await http.post(
            await hospital.token_endpoint(),
            data={
                "grant_type": "client_credentials",
                "scope": "system/Patient.rs",
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": rogue,
            },
        )
    assert refused.status_code == 401
    await exchange.audit_settled()
    org = hospital.org_id  # type: ignore[attr-defined]
    issued = await auditor.call(
        "GET", "/api/v1/audit/events", params={"organization_id": org, "type": "token.issue"}, purpose="audit"
    )
    denied = await auditor.call(
        "GET", "/api/v1/audit/events", params={"organization_id": org, "type": "token.refused"}, purpose="audit"
    )
    assert len(issued.json()["events"]) == 1
    event = issued.json()["events"][0]
    assert event["client_id"] == hospital.client_id
    assert event["entities"] == [{"type": "Client", "id": hospital.client_id}]
    assert event["source_service"] == "gateway"
    assert [e["outcome"] for e in denied.json()["events"]] == ["minor-failure"]
    for member in (hospital, auditor):
        await member.aclose()
