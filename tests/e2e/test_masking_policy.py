"""The masking policy on every patient the exchange returns, per role and purpose of use, over
HTTP through the gateway (FHIR PDQm search and the REST registration response)."""

from __future__ import annotations

import secrets
from typing import Any

import pytest

from gateway.client import HospitalClient, Practitioner
from tests.conftest import Exchange
from tests.support.factories import fresh_national_id

STEWARD = Practitioner(id="DS-9", name="吴管理", role="data-steward", department="病案室")
ADMIN = Practitioner(id="AD-9", name="郑信息", role="admin", department="信息科")
DOCTOR = Practitioner(id="D-9", name="李医生", role="doctor", department="呼吸内科")


def _telecom(resource: dict[str, Any]) -> list[str]:
    return [t["value"] for t in resource.get("telecom", [])]


def _national_ids(resource: dict[str, Any]) -> list[str]:
    return [i["value"] for i in resource["identifier"] if i.get("system") == "urn:hie:identifier:cn-resident-id"]


@pytest.fixture
async def registered(exchange: Exchange) -> tuple[HospitalClient, dict[str, str]]:
    hospital = await exchange.member(name="市第三人民医院")
    hospital.scopes = "system/Patient.crus"
    born = f"19{secrets.randbelow(60) + 30}-0{secrets.randbelow(9) + 1}-1{secrets.randbelow(9)}"
    patient = {
        "local_id": f"MASK-{secrets.token_hex(3)}",
        "name": "上官婉儿",
        "gender": "female",
        "birth_date": born,
        "national_id": fresh_national_id(),
        "phones": [f"139{secrets.randbelow(10**8):08d}"],
        "address": {"province": "浙江省", "city": "杭州市", "district": "西湖区", "line": "文三路 90 号"},
    }
    created = await hospital.call("POST", "/api/v1/patients", json=patient)
    assert created.status_code == 201, created.text
    return hospital, {**patient, "born": born, "enterprise_id": created.json()["enterprise_id"]}


async def _found(hospital: HospitalClient, patient: dict[str, Any], **call: Any) -> dict[str, Any]:
    response = await hospital.call(
        "GET", "/fhir/R4/Patient", params={"family": "上官", "given": "婉儿", "birthdate": patient["born"]}, **call
    )
    assert response.status_code == 200, response.text
    [entry] = [
        e
        for e in response.json()["entry"]
        if {"system": "urn:hie:enterprise-id", "use": "official", "value": patient["enterprise_id"]}
        in e["resource"]["identifier"]
    ]
    return entry["resource"]


async def test_a_treating_doctor_reaches_the_patient_but_sees_the_national_id_partly_hidden(
    registered: tuple[HospitalClient, dict[str, Any]],
) -> None:
    hospital, patient = registered
    resource = await _found(hospital, patient, as_user=DOCTOR, purpose="treatment")
    nid = patient["national_id"]
    assert _national_ids(resource) == [f"{nid[:6]}********{nid[-4:]}"]
    assert _telecom(resource) == patient["phones"]
    assert resource["address"][0]["line"] == ["文三路 90 号"]
    assert resource["name"][0]["text"] == "上官婉儿"
    assert resource["birthDate"] == patient["born"]


async def test_a_platform_steward_searching_gets_a_candidate_not_a_directory(
    registered: tuple[HospitalClient, dict[str, Any]], exchange: Exchange
) -> None:
    """Stewards are the platform operator's staff (a hospital may not assert the role); a search
    shows them, as anyone outside the patient's domain, masked identifiers and no phone or street
    (they see full identifiers on the review tasks they resolve)."""
    hospital, patient = registered
    refused = await hospital.call(
        "GET", "/fhir/R4/Patient", params={"family": "上官"}, as_user=STEWARD, purpose="operations"
    )
    assert refused.status_code == 401
    platform = await exchange.member(type="platform-admin", name="平台运营")
    platform.scopes = "system/Patient.rs"
    resource = await _found(platform, patient, as_user=STEWARD, purpose="operations")
    nid = patient["national_id"]
    assert _national_ids(resource) == [f"{nid[:6]}********{nid[-4:]}"]
    assert _telecom(resource) == []
    assert "line" not in resource["address"][0]
    await platform.aclose()


async def test_an_administrator_gets_the_default_phone_and_address_to_district(
    registered: tuple[HospitalClient, dict[str, Any]],
) -> None:
    hospital, patient = registered
    resource = await _found(hospital, patient, as_user=ADMIN, purpose="operations")
    phone = patient["phones"][0]
    assert _telecom(resource) == [f"{phone[:3]}****{phone[7:]}"]
    assert resource["address"] == [{"district": "西湖区", "city": "杭州市", "state": "浙江省"}]
    nid = patient["national_id"]
    assert _national_ids(resource) == [f"{nid[:6]}********{nid[-4:]}"]
    assert resource["name"][0]["text"] == "上官婉儿"


async def test_research_gets_a_de_identified_record_whatever_the_role(
    registered: tuple[HospitalClient, dict[str, Any]],
) -> None:
    hospital, patient = registered
    for user in (DOCTOR, ADMIN):
        resource = await _found(hospital, patient, as_user=user, purpose="research")
        assert "name" not in resource
        assert "telecom" not in resource
        assert _national_ids(resource) == []
        assert resource["birthDate"] == patient["born"][:4]
        assert resource["address"] == [{"city": "杭州市", "state": "浙江省"}]
        text = str(resource)
        for clear in (patient["local_id"], patient["national_id"], patient["phones"][0], "文三路", "婉儿"):
            assert clear not in text
        # The enterprise id stays: a pseudonym that links the person's data without naming them.
        assert any(i["system"].endswith("enterprise-id") for i in resource["identifier"])


async def test_the_registration_response_is_masked_for_the_registering_role_too(exchange: Exchange) -> None:
    hospital = await exchange.member(name="市第四人民医院")
    hospital.scopes = "system/Patient.crus"
    nid, phone = fresh_national_id(), f"137{secrets.randbelow(10**8):08d}"
    body = {"local_id": "REG-1", "name": "欧阳修", "gender": "male", "national_id": nid, "phones": [phone]}
    created = await hospital.call("POST", "/api/v1/patients", json=body, as_user=ADMIN, purpose="operations")
    assert created.status_code == 201, created.text
    returned = created.json()
    assert [i["value"] for i in returned["identifiers"] if i["type"] == "NNCHN"] == [f"{nid[:6]}********{nid[-4:]}"]
    assert returned["phones"] == [f"{phone[:3]}****{phone[7:]}"]


async def test_fhir_read_of_a_pdq_result_is_masked_like_search_and_unknown_ids_are_404(
    registered: tuple[HospitalClient, dict[str, Any]], exchange: Exchange
) -> None:
    hospital, patient = registered
    found = await _found(hospital, patient, as_user=DOCTOR, purpose="treatment")
    # Another hospital's clinician reads the record PDQ gave them.
    other = await exchange.member(name="市第五人民医院")
    other.scopes = "system/Patient.crus"
    read = await other.call("GET", f"/fhir/R4/Patient/{found['id']}", as_user=DOCTOR, purpose="treatment")
    assert read.status_code == 200, read.text
    assert read.headers["content-type"].startswith("application/fhir+json")
    # Another domain's record: enough to pick the person, not how to reach them.
    shown = read.json()
    assert shown["name"] == found["name"]
    assert shown["birthDate"] == found["birthDate"]
    assert "telecom" not in shown
    assert "line" not in shown["address"][0]
    nid = patient["national_id"]
    assert _national_ids(shown) == [f"{nid[:6]}********{nid[-4:]}"]
    research = await other.call("GET", f"/fhir/R4/Patient/{found['id']}", as_user=DOCTOR, purpose="research")
    assert "name" not in research.json()
    assert research.json()["birthDate"] == patient["born"][:4]
    for missing in ("00000000-0000-0000-0000-000000000000", "not-a-record", "%E5%BC%A0%E4%B8%89"):
        response = await other.call("GET", f"/fhir/R4/Patient/{missing}", as_user=DOCTOR, purpose="treatment")
        assert response.status_code == 404, response.text
        assert response.json()["resourceType"] == "OperationOutcome"
