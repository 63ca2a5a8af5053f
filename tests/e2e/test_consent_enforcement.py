"""Consent enforced end to end through the gateway: a document consent denies is absent from
search and 403 on retrieve; an accepted referral or break-the-glass opens it, and it closes again
when the referral is cancelled or the break-the-glass expires. Directives over REST and FHIR."""

from __future__ import annotations

import asyncio
import datetime
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from gateway.client import HospitalClient, Practitioner
from tests.conftest import Exchange
from tests.support.factories import document, person
from tests.support.webhooks import Receiver

SCOPES = (
    "system/Patient.crs system/DocumentReference.crs system/ServiceRequest.crus system/Consent.cruds "
    "system/AuditEvent.rs"
)
EMERGENCY_DOCTOR = Practitioner(id="B-ER-1", name="急诊科医生", role="doctor", department="急诊科")


@dataclass
class Scene:
    exchange: Exchange
    a: HospitalClient
    b: HospitalClient
    enterprise_id: str
    summary_id: str
    psy_id: str

    async def visible_to_b(self, purpose: str) -> set[str]:
        found = await self.b.call("GET", "/api/v1/documents", params={"patient_local_id": "CE-B"}, purpose=purpose)
        assert found.status_code == 200, found.text
        return {e["document_id"] for e in found.json()["entries"]}

    async def retrieve_by_b(self, document_id: str, purpose: str) -> int:
        response = await self.b.call("GET", f"/api/v1/documents/{document_id}/content", purpose=purpose)
        if response.status_code == 403:
            assert response.json()["error"]["reason"] == "consent-denied"
        return response.status_code


@pytest.fixture
async def scene(exchange: Exchange) -> AsyncIterator[Scene]:
    a = await exchange.member(scopes=SCOPES, name="城西社区卫生服务中心")
    b = await exchange.member(scopes=SCOPES, name="市第一人民医院")
    a.practitioner = Practitioner(id="A-GP-1", name="全科医生", role="doctor", department="全科")
    b.practitioner = EMERGENCY_DOCTOR
    patient = person("周十四")
    at_a = await a.call("POST", "/api/v1/patients", json={"local_id": "CE-A", **patient})
    assert at_a.status_code == 201, at_a.text
    at_b = await b.call("POST", "/api/v1/patients", json={"local_id": "CE-B", **patient})
    assert at_b.json()["enterprise_id"] == at_a.json()["enterprise_id"]
    summary = await a.call("POST", "/api/v1/documents", json=document("CE-A", "出院小结：病情稳定".encode()))
    psy = await a.call(
        "POST", "/api/v1/documents", json=document("CE-A", "心理评估记录".encode(), security_labels=["PSY"])
    )
    assert summary.status_code == psy.status_code == 201
    yield Scene(exchange, a, b, at_a.json()["enterprise_id"], summary.json()["document_id"], psy.json()["document_id"])
    for member in (a, b):
        await member.aclose()


async def test_referral_grant_opens_and_cancel_closes(scene: Scene) -> None:
    s = scene
    # The regional default (opt-out) does not cover the purpose referral.
    assert await s.visible_to_b("referral") == set()
    assert await s.retrieve_by_b(s.summary_id, "referral") == 403

    referral = {
        "patient_local_id": "CE-A",
        "target_organization_id": s.b.org_id,  # type: ignore[attr-defined]
        "direction": "up",
        "reason": "血压控制不佳，转上级医院",
        "document_ids": [s.summary_id, s.psy_id],
    }
    create_key = {"Idempotency-Key": secrets.token_hex(8)}
    created = await s.a.call("POST", "/api/v1/referrals", purpose="referral", json=referral, headers=create_key)
    assert created.status_code == 201, created.text
    referral_id = created.json()["referral_id"]
    # Only the receiving hospital accepts.
    refused = await s.a.call("POST", f"/api/v1/referrals/{referral_id}/accept", purpose="referral")
    assert (refused.status_code, refused.json()["error"]["reason"]) == (403, "referral-party")
    accept_key = {"Idempotency-Key": secrets.token_hex(8)}
    accepted, accepted_again = [
        await s.b.call(
            "POST",
            f"/api/v1/referrals/{referral_id}/accept",
            purpose="referral",
            json={"reason": "同意接收"},
            headers=accept_key,
        )
        for _ in range(2)
    ]
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["state"] == "accepted"
    assert [h["to"] for h in accepted.json()["history"]] == ["accepted"]
    # Keyed retries answer the first answers (the accept's audit event; the creation as created).
    assert accepted_again.json() == accepted.json()
    assert len(accepted.json()["audit_event_ids"]) == 1
    created_again = await s.a.call("POST", "/api/v1/referrals", purpose="referral", json=referral, headers=create_key)
    assert (created_again.status_code, created_again.json()) == (201, created.json())
    await s.exchange.audit_settled()  # the referral outbox delivers the grant to consent

    # The attached summary is visible for the referral; the attached mental-health note is not
    # (a restricted class needs the patient's explicit permit).
    assert await s.visible_to_b("referral") == {s.summary_id}
    assert await s.retrieve_by_b(s.summary_id, "referral") == 200
    assert await s.retrieve_by_b(s.psy_id, "referral") == 403
    # The grant is for the referral purpose only.
    assert await s.visible_to_b("research") == set()

    cancelled = await s.a.call("POST", f"/api/v1/referrals/{referral_id}/cancel", purpose="referral")
    assert cancelled.json()["state"] == "cancelled"
    await s.exchange.audit_settled()
    assert await s.visible_to_b("referral") == set()
    assert await s.retrieve_by_b(s.summary_id, "referral") == 403
    late = await s.b.call("POST", f"/api/v1/referrals/{referral_id}/complete", purpose="referral")
    assert (late.status_code, late.json()["error"]["reason"]) == (422, "referral-state")


async def test_consultation_grant_opens_and_cancel_closes(scene: Scene) -> None:
    s = scene
    assert await s.visible_to_b("consultation") == set()
    requested = await s.a.call(
        "POST",
        "/api/v1/consultations",
        purpose="consultation",
        json={
            "patient_local_id": "CE-A",
            "consultant_organization_id": s.b.org_id,  # type: ignore[attr-defined]
            "kind": "imaging",
            "question": "胸片阴影性质待定",
            "document_ids": [s.summary_id],
        },
    )
    assert requested.status_code == 201, requested.text
    consultation_id = requested.json()["consultation_id"]
    refused = await s.a.call("POST", f"/api/v1/consultations/{consultation_id}/accept", purpose="consultation")
    assert (refused.status_code, refused.json()["error"]["reason"]) == (403, "consultation-party")
    # The patient's informed consent first (the signed form is a document of the requester), and
    # a qualified specialist of the consultant's directory to assign.
    recorded = await s.a.call(
        "POST",
        f"/api/v1/consultations/{consultation_id}/record-consent",
        purpose="consultation",
        json={"informed_consent": {"evidence_document_id": s.summary_id, "signer": "patient"}},
    )
    assert recorded.status_code == 200, recorded.text
    listed = await s.b.call(
        "PUT",
        f"/api/v1/specialists/{EMERGENCY_DOCTOR.id}",
        as_user=Practitioner(id="B-ADM", name="信息科", role="admin", department="信息科"),
        json={"name": EMERGENCY_DOCTOR.name, "years_independent_practice": 5, "kinds": ["imaging"]},
    )
    assert listed.status_code == 200, listed.text
    accepted = await s.b.call(
        "POST",
        f"/api/v1/consultations/{consultation_id}/accept",
        purpose="consultation",
        json={"assignee_ids": [EMERGENCY_DOCTOR.id]},
    )
    assert accepted.status_code == 200, accepted.text
    assert (accepted.json()["state"], [h["to"] for h in accepted.json()["history"]]) == (
        "assigned",
        ["requested", "assigned"],
    )
    await s.exchange.audit_settled()  # the teleconsult outbox delivers the grant to consent
    assert await s.visible_to_b("consultation") == {s.summary_id}
    assert await s.visible_to_b("referral") == set()
    cancel_key = {"Idempotency-Key": secrets.token_hex(8)}
    cancelled, cancelled_again = [
        await s.a.call(
            "POST", f"/api/v1/consultations/{consultation_id}/cancel", purpose="consultation", headers=cancel_key
        )
        for _ in range(2)
    ]
    assert cancelled.json()["state"] == "cancelled"
    assert cancelled_again.json() == cancelled.json()
    assert len(cancelled.json()["audit_event_ids"]) == 1
    reused = await s.a.call(
        "POST", f"/api/v1/consultations/{consultation_id}/accept", purpose="consultation", headers=cancel_key
    )
    assert (reused.status_code, reused.json()["error"]["reason"]) == (409, "idempotency-key-reused")
    await s.exchange.audit_settled()
    assert await s.visible_to_b("consultation") == set()
    assert await s.retrieve_by_b(s.summary_id, "consultation") == 403


async def test_directive_and_break_glass(scene: Scene) -> None:
    s = scene
    assert await s.visible_to_b("treatment") == {s.summary_id}
    # The patient objects to hospital B (recorded by A with the signed form as evidence).
    recorded = await s.a.call(
        "POST",
        "/api/v1/consent/directives",
        json={
            "patient_local_id": "CE-A",
            "policy_ids": ["urn:oid:2.16.156.10011.2.5.1"],
            "evidence_document_id": "consent-form-CE-1",
            "provision": {
                "type": "deny",
                "actors": [{"kind": "organization", "organization_id": s.b.org_id}],  # type: ignore[attr-defined]
            },
        },
    )
    assert recorded.status_code == 201, recorded.text
    directive_id = recorded.json()["directive_id"]
    assert await s.visible_to_b("treatment") == set()
    assert await s.retrieve_by_b(s.summary_id, "treatment") == 403

    # The emergency doctor at B declares break-the-glass (short, for the test).
    refused = await s.b.call(
        "POST",
        "/api/v1/consent/break-glass",
        json={"patient_local_id": "CE-B", "reason": "患者昏迷", "duration_seconds": 2},
    )
    assert (refused.status_code, refused.json()["error"]["reason"]) == (403, "purpose")
    declared = await s.b.call(
        "POST",
        "/api/v1/consent/break-glass",
        purpose="emergency",
        json={"patient_local_id": "CE-B", "reason": "患者昏迷送入急诊，需既往病史", "duration_seconds": 2},
    )
    assert declared.status_code == 201, declared.text
    expires = datetime.datetime.fromisoformat(declared.json()["expires"])
    assert await s.visible_to_b("emergency") == {s.summary_id, s.psy_id}
    assert await s.retrieve_by_b(s.summary_id, "emergency") == 200
    # Not for other purposes, nor for another doctor of the same hospital.
    assert await s.visible_to_b("treatment") == set()
    other = await s.b.call(
        "GET",
        "/api/v1/documents",
        params={"patient_local_id": "CE-B"},
        purpose="emergency",
        as_user=Practitioner(id="B-ER-2", name="另一位医生", role="doctor", department="急诊科"),
    )
    assert other.json()["entries"] == []

    # Break-glass accesses are on the record as such, for the regional authority.
    await s.exchange.audit_settled()
    auditor = await s.exchange.member(type="authority", scopes="system/AuditEvent.rs", name="市卫健委")
    report = await auditor.call(
        "GET",
        "/api/v1/audit/reports/break-glass",
        params={"organization_id": s.b.org_id},  # type: ignore[attr-defined]
        purpose="audit",
    )
    assert report.status_code == 200, report.text
    actions = sorted(e["action"] for e in report.json()["events"])
    assert actions[0] == "create"
    assert "read" in actions
    assert all(e["patient_enterprise_id"] == s.enterprise_id for e in report.json()["events"])
    explained = await auditor.call(
        "POST",
        "/api/v1/consent/explain",
        purpose="audit",
        json={
            "enterprise_id": s.enterprise_id,
            "item": {"document_id": s.summary_id, "source_organization_id": s.a.org_id},  # type: ignore[attr-defined]
            "organization_id": s.b.org_id,  # type: ignore[attr-defined]
            "practitioner_id": EMERGENCY_DOCTOR.id,
            "purpose_of_use": "emergency",
        },
    )
    assert explained.status_code == 200, explained.text
    assert explained.json()["basis"] in {"break-glass", "directive-deny"}
    assert "Consent/" in explained.json()["explanation"] or "break-glass/" in explained.json()["explanation"]
    await auditor.aclose()

    # It expires on its own.
    await asyncio.sleep(max(0.0, (expires - datetime.datetime.now(datetime.UTC)).total_seconds()) + 0.05)
    assert await s.visible_to_b("emergency") == set()
    assert await s.retrieve_by_b(s.summary_id, "emergency") == 403

    # Revoking the directive takes effect on the next request.
    revoked = await s.a.call("DELETE", f"/api/v1/consent/directives/{directive_id}")
    assert revoked.json()["status"] == "revoked"
    assert await s.visible_to_b("treatment") == {s.summary_id}


async def test_fhir_consent_create_read_search(scene: Scene) -> None:
    s = scene
    consent = {
        "resourceType": "Consent",
        "status": "active",
        "scope": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"identifier": {"system": f"urn:hie:patient-id:{s.a.org_id}", "value": "CE-A"}},  # type: ignore[attr-defined]
        "policy": [{"uri": "urn:oid:2.16.156.10011.2.5.1"}],
        "sourceReference": {"reference": "DocumentReference/consent-form-CE-2"},
        "provision": {
            "type": "deny",
            "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HRESCH"}],
            "provision": [
                {
                    "type": "permit",
                    "actor": [
                        {
                            # Consent.provision.actor.role is required (1..1) in FHIR R4.
                            "role": {
                                "coding": [
                                    {
                                        "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                        "code": "IRCP",
                                    }
                                ]
                            },
                            "reference": {
                                "identifier": {"system": "urn:hie:organization", "value": s.b.org_id}  # type: ignore[attr-defined]
                            },
                        }
                    ],
                    "securityLabel": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "PSY"}],
                    "extension": [{"url": "urn:hie:obligation", "valueCode": "deidentify"}],
                }
            ],
        },
    }
    created = await s.a.call("POST", "/fhir/R4/Consent", json=consent)
    assert created.status_code == 201, created.text
    assert created.headers["content-type"].startswith("application/fhir+json")
    resource = created.json()
    assert resource["resourceType"] == "Consent"
    assert resource["status"] == "active"
    assert resource["sourceReference"] == {"reference": "DocumentReference/consent-form-CE-2"}
    nested = resource["provision"]["provision"][0]
    assert nested["type"] == "permit"
    assert nested["actor"][0]["reference"]["identifier"]["value"] == s.b.org_id  # type: ignore[attr-defined]
    assert resource["provision"]["purpose"] == [{"system": "urn:hie:purpose-of-use", "code": "research"}]

    # The nested permit is the most specific for B's research: the PSY note, de-identified.
    found = await s.b.call("GET", "/api/v1/documents", params={"patient_local_id": "CE-B"}, purpose="research")
    assert {e["document_id"] for e in found.json()["entries"]} == {s.psy_id}

    read = await s.b.call("GET", f"/fhir/R4/Consent/{resource['id']}")
    assert read.status_code == 200
    assert read.json()["provision"] == resource["provision"]
    searched = await s.b.call("GET", "/fhir/R4/Consent", params={"patient.identifier": "CE-B"})
    assert searched.status_code == 200, searched.text
    assert searched.json()["resourceType"] == "Bundle"
    assert [e["resource"]["id"] for e in searched.json()["entry"]] == [resource["id"]]

    bad = await s.a.call("POST", "/fhir/R4/Consent", json={**consent, "provision": {"type": "maybe"}})
    assert bad.status_code == 400
    assert bad.json()["resourceType"] == "OperationOutcome"
    no_evidence = await s.a.call(
        "POST", "/fhir/R4/Consent", json={k: v for k, v in consent.items() if k != "sourceReference"}
    )
    assert no_evidence.status_code == 400
    assert no_evidence.json()["issue"][0]["details"]["coding"][0]["code"] == "evidence-missing"
    missing = await s.b.call("GET", "/fhir/R4/Consent/00000000-0000-0000-0000-000000000000")
    assert (missing.status_code, missing.json()["resourceType"]) == (404, "OperationOutcome")
    statement = (await s.a.http.get(f"{s.exchange.base_url}/fhir/R4/metadata")).json()
    served = {r["type"]: r for r in statement["rest"][0]["resource"]}
    assert [i["code"] for i in served["Consent"]["interaction"]] == ["create", "read", "search-type"]
    stranger = await s.exchange.member(scopes=SCOPES, name="无关医院")
    hidden = await stranger.call("GET", f"/fhir/R4/Consent/{resource['id']}")
    assert hidden.status_code == 404
    await stranger.aclose()


async def test_break_glass_notifies_the_patients_home_hospital(scene: Scene) -> None:
    """The notice travels the registry's notification broker to the home hospital's endpoint."""
    s = scene
    receiver = Receiver()
    await receiver.start()
    try:
        subscribed = await s.a.call(
            "POST",
            "/api/v1/subscriptions",
            json={
                "topic": "workflow-state",
                "endpoint_url": receiver.url,
                "expires": (datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)).isoformat(),
            },
        )
        assert subscribed.status_code == 201, subscribed.text
        # Declared with an idempotency key and retried (the first answer was lost): one
        # declaration, one notice, the first answer again.
        key = secrets.token_hex(8)
        declared, retried = [
            await s.b.call(
                "POST",
                "/api/v1/consent/break-glass",
                purpose="emergency",
                headers={"Idempotency-Key": key},
                json={"patient_local_id": "CE-B", "reason": "患者昏迷送入急诊", "duration_seconds": 60},
            )
            for _ in range(2)
        ]
        assert declared.status_code == 201, declared.text
        assert (retried.status_code, retried.json()) == (201, declared.json())
        await s.exchange.audit_settled()
        notices = [json.loads(body) for _headers, body, _status in receiver.acknowledged()]
        assert [n["event_type"] for n in notices] == ["consent.break-glass"]
        assert notices[0]["resource"] == {
            "type": "Consent",
            "id": declared.json()["break_glass_id"],
            "status": "break-the-glass",
        }
        assert "周十四" not in json.dumps(notices, ensure_ascii=False)  # ids only, no patient data
    finally:
        await receiver.stop()


async def test_a_data_period_deny_hides_only_care_within_the_period(scene: Scene) -> None:
    """The registry tells consent when each document's care happened (service start)."""
    s = scene
    old = await s.a.call(
        "POST",
        "/api/v1/documents",
        json=document("CE-A", "2015年门诊病历".encode(), service_start="2015-06-01T08:00:00+08:00"),
    )
    assert old.status_code == 201, old.text
    old_id = old.json()["document_id"]
    assert old_id in await s.visible_to_b("treatment")
    recorded = await s.a.call(
        "POST",
        "/api/v1/consent/directives",
        json={
            "patient_local_id": "CE-A",
            "policy_ids": ["urn:oid:2.16.156.10011.2.5.1"],
            "evidence_document_id": "consent-form-CE-2",
            "provision": {
                "type": "deny",
                "data_period": {"start": "2010-01-01T00:00:00+08:00", "end": "2019-12-31T23:59:59+08:00"},
            },
        },
    )
    assert recorded.status_code == 201, recorded.text
    visible = await s.visible_to_b("treatment")
    assert old_id not in visible
    assert s.summary_id in visible  # care recorded now, outside the period
    assert await s.retrieve_by_b(old_id, "treatment") == 403
