"""The referral workflow as a 360X-over-FHIR client drives it through the gateway: ServiceRequest
create / read / search, the coordination Task read and updated to make each move (a stale
versionId refused), Slot search, Appointment, Communication (interim notes), CarePlan of a
down-referral, each in the CapabilityStatement; every resource valid R4B (fhir.resources)."""

from __future__ import annotations

import datetime
from typing import Any

import httpx
from fhir.resources.R4B.appointment import Appointment
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.careplan import CarePlan
from fhir.resources.R4B.servicerequest import ServiceRequest
from fhir.resources.R4B.task import Task

from gateway.client import HospitalClient, Practitioner
from gateway.organizations import set_tier
from tests.conftest import Exchange
from tests.support.factories import document, person
from tests.support.fhir_rules import check_fhir

SCOPES = "system/Patient.crs system/DocumentReference.crs system/ServiceRequest.crus"
BSER = "http://hl7.org/fhir/us/bser/CodeSystem/TaskBusinessStatusCS"
LOCAL = "urn:hie:referral-business-status"


async def _put_task(
    client: HospitalClient, task: dict[str, Any], code: str, system: str = BSER, **fields: Any
) -> httpx.Response:
    body = {**task, "businessStatus": {"coding": [{"system": system, "code": code}]}, **fields}
    return await client.call(
        "PUT",
        f"/fhir/R4/Task/{task['id']}",
        json=body,
        purpose="referral",
        headers={"Content-Type": "application/fhir+json"},
    )


async def test_referral_through_fhir(exchange: Exchange) -> None:
    community = await exchange.member(scopes=SCOPES, name="城北社区卫生服务中心")
    hospital = await exchange.member(scopes=SCOPES, name="市中心医院")
    community.practitioner = Practitioner(id="F-GP", name="全科医生", role="doctor", department="全科")
    hospital.practitioner = Practitioner(id="F-SP", name="神经内科医生", role="doctor", department="神经内科")
    c_org, h_org = community.org_id, hospital.org_id  # type: ignore[attr-defined]
    await set_tier(exchange.settings, org_id=c_org, tier="community")
    await set_tier(exchange.settings, org_id=h_org, tier="tertiary")
    try:
        patient = person("郑二十")
        assert (
            await community.call("POST", "/api/v1/patients", json={"local_id": "FR-C", **patient})
        ).status_code == 201
        assert (
            await hospital.call("POST", "/api/v1/patients", json={"local_id": "FR-H", **patient})
        ).status_code == 201
        start = datetime.datetime.now(datetime.UTC).replace(microsecond=0) + datetime.timedelta(days=3)
        slots = await hospital.call(
            "POST",
            "/api/v1/referral-slots",
            json={
                "slots": [
                    {
                        "department": "神经内科",
                        "start": start.isoformat(),
                        "end": (start + datetime.timedelta(minutes=30)).isoformat(),
                    }
                ]
            },
        )
        slot_id = slots.json()["slots"][0]["slot_id"]

        request = {
            "resourceType": "ServiceRequest",
            "status": "active",
            "intent": "order",
            "priority": "urgent",
            "subject": {"identifier": {"system": f"urn:hie:patient-id:{c_org}", "value": "FR-C"}},
            "performer": [{"identifier": {"system": "urn:hie:organization", "value": h_org}}],
            "reasonCode": [
                {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": "G45.9"}], "text": "短暂性脑缺血发作"}
            ],
            "note": [{"text": "反复头晕伴言语不清"}],
        }
        bad = await community.call(
            "POST",
            "/fhir/R4/ServiceRequest",
            json={**request, "reasonCode": [{"coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": "G4"}]}]},
            purpose="referral",
        )
        assert bad.status_code == 400
        assert bad.json()["resourceType"] == "OperationOutcome"
        assert "diagnosis.code" in bad.json()["issue"][0]["diagnostics"]
        created = await community.call("POST", "/fhir/R4/ServiceRequest", json=request, purpose="referral")
        assert created.status_code == 201, created.text
        sr = ServiceRequest.model_validate(created.json())
        assert (sr.priority, sr.status, sr.reasonCode[0].coding[0].code) == ("urgent", "active", "G45.9")
        referral_id = sr.id

        task = (await hospital.call("GET", f"/fhir/R4/Task/{referral_id}", purpose="referral")).json()
        assert Task.model_validate(task).status == "requested"
        assert task["focus"]["reference"] == f"ServiceRequest/{referral_id}"
        incoming = Bundle.model_validate((await hospital.call("GET", "/fhir/R4/Task", purpose="referral")).json())
        assert referral_id in {e.resource.id for e in incoming.entry or []}

        wrong_side = await _put_task(community, task, "3.0")
        assert wrong_side.status_code == 403
        accepted = await _put_task(hospital, task, "3.0")
        assert accepted.status_code == 200, accepted.text
        assert (accepted.json()["status"], accepted.json()["businessStatus"]["coding"][0]["code"]) == (
            "accepted",
            "3.0",
        )
        stale = await _put_task(hospital, task, "5.1.1")  # meta.versionId of before the accept
        assert stale.status_code == 422
        assert stale.json()["issue"][0]["details"]["coding"][0]["code"] == "referral-version"
        task = accepted.json()
        free = Bundle.model_validate(
            (await community.call("GET", "/fhir/R4/Slot", params={"organization": h_org, "status": "free"})).json()
        )
        assert slot_id in {e.resource.id for e in free.entry or []}
        slot_input = [{"type": {"coding": [{"code": "slot"}]}, "valueReference": {"reference": f"Slot/{slot_id}"}}]
        scheduled = await _put_task(hospital, task, "5.1.1", input=slot_input)
        assert scheduled.status_code == 200, scheduled.text
        booked = Appointment.model_validate(
            (await community.call("GET", f"/fhir/R4/Appointment/{referral_id}", purpose="referral")).json()
        )
        assert (booked.status, booked.start.isoformat()) == ("booked", start.isoformat())
        arrived = await _put_task(hospital, scheduled.json(), "arrived", system=LOCAL)
        assert arrived.json()["status"] == "in-progress"
        noted = await hospital.call(
            "PUT",
            f"/fhir/R4/Task/{referral_id}",
            json={**arrived.json(), "note": [{"text": "头颅MRI未见急性梗死"}]},
            purpose="referral",
        )
        assert noted.status_code == 200, noted.text
        notes = Bundle.model_validate(
            (
                await community.call(
                    "GET",
                    "/fhir/R4/Communication",
                    params={"based-on": f"ServiceRequest/{referral_id}"},
                    purpose="referral",
                )
            ).json()
        )
        assert [e.resource.payload[0].contentString for e in notes.entry or []] == ["头颅MRI未见急性梗死"]
        outcome = await hospital.call("POST", "/api/v1/documents", json=document("FR-H", "会诊记录：TIA".encode()))
        completed = await _put_task(
            hospital,
            noted.json(),
            "7.0",
            output=[
                {
                    "type": {"coding": [{"code": "outcome"}]},
                    "valueReference": {"reference": f"DocumentReference/{outcome.json()['document_id']}"},
                }
            ],
        )
        assert completed.status_code == 200, completed.text
        done = Task.model_validate(completed.json())
        assert (done.status, done.output[0].valueReference.reference) == (
            "completed",
            f"DocumentReference/{outcome.json()['document_id']}",
        )
        closed = await _put_task(community, completed.json(), "loop-closed", system=LOCAL)
        assert closed.json()["businessStatus"]["coding"][0]["code"] == "loop-closed"
        sr_now = ServiceRequest.model_validate(
            (await community.call("GET", f"/fhir/R4/ServiceRequest/{referral_id}", purpose="referral")).json()
        )
        assert sr_now.status == "completed"

        # A down-referral's care plan.
        down = await hospital.call(
            "POST",
            "/api/v1/referrals",
            json={
                "patient_local_id": "FR-H",
                "target_organization_id": c_org,
                "parent_referral_id": referral_id,
                "diagnosis": {"code": "G45.9"},
                "care_plan": {
                    "follow_ups": [
                        {"description": "一月后复诊", "due": (start + datetime.timedelta(days=30)).isoformat()}
                    ],
                    "medication": "氯吡格雷 75mg qd",
                },
            },
            purpose="referral",
        )
        assert down.status_code == 201, down.text
        plan = CarePlan.model_validate(
            (await community.call("GET", f"/fhir/R4/CarePlan/{down.json()['referral_id']}", purpose="referral")).json()
        )
        assert [a.detail.description for a in plan.activity] == ["一月后复诊"]

        # Every referral resource by the facade's rules: R4B, and no empty arrays, objects or strings.
        down_id = down.json()["referral_id"]
        for client, path, params in [
            (community, f"ServiceRequest/{referral_id}", None),
            (hospital, f"Task/{referral_id}", None),
            (hospital, "Task", None),
            (community, f"Appointment/{referral_id}", None),
            (community, "Slot", {"organization": h_org}),
            (community, "Communication", {"based-on": f"ServiceRequest/{referral_id}"}),
            (community, f"CarePlan/{down_id}", None),
            (community, f"ServiceRequest/{down_id}", None),
            (community, f"Task/{down_id}", None),
        ]:
            read = await client.call("GET", f"/fhir/R4/{path}", params=params, purpose="referral")
            assert read.status_code == 200, read.text
            await check_fhir(read.json(), base=exchange.base_url)
        for resource in (created.json(), accepted.json(), completed.json(), closed.json()):
            await check_fhir(resource, base=exchange.base_url)

        statement = (await community.call("GET", "/fhir/R4/metadata")).json()
        types = {r["type"] for r in statement["rest"][0]["resource"]}
        assert {"ServiceRequest", "Task", "Appointment", "Slot", "CarePlan", "Communication"} <= types
    finally:
        await community.aclose()
        await hospital.aclose()
