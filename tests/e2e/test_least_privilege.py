"""Least privilege across hospitals, attacked through the gateway as the security test did:
who may assert which role, what a cross-domain search returns, clinical reads only with a care
relationship, typed user-assertion claims, one assertion per request, break-the-glass bound to
the role that declared it."""

from __future__ import annotations

import datetime
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import pytest

from gateway.client import HospitalClient, Practitioner
from services.shared.config import TOKEN_AUDIENCE
from services.shared.keys import algorithm_for, public_jwk
from tests.conftest import Exchange
from tests.support.factories import document, fresh_national_id, person

SCOPES = (
    "system/Patient.crs system/DocumentReference.crs system/Binary.r system/ServiceRequest.crus "
    "system/Consent.cruds system/AuditEvent.rs"
)
STEWARD = Practitioner(id="S-1", name="数据管理员", role="data-steward", department="主索引组")
NATIONAL_ID = fresh_national_id()
DOCTOR = Practitioner(id="D-1", name="王医生", role="doctor", department="急诊科")


@dataclass
class Region:
    exchange: Exchange
    a: HospitalClient
    b: HospitalClient
    c: HospitalClient
    patient: dict[str, Any]
    document_id: str


@pytest.fixture
async def region(exchange: Exchange) -> AsyncIterator[Region]:
    a = await exchange.member(scopes=SCOPES, name="市第一医院")
    b = await exchange.member(scopes=SCOPES, name="区中心医院")
    c = await exchange.member(scopes=SCOPES, name="镇卫生院")
    for member in (a, b, c):
        member.practitioner = DOCTOR
    patient = person(
        "欧阳娜娜",
        phones=["13912345678"],
        address={"province": "北京市", "city": "北京市", "district": "朝阳区", "line": "建国路88号3单元"},
    )
    registered = await a.call("POST", "/api/v1/patients", json={"local_id": "LP-A", **patient})
    assert registered.status_code == 201, registered.text
    doc = await a.call("POST", "/api/v1/documents", json=document("LP-A", "出院小结：冠心病".encode()))
    assert doc.status_code == 201, doc.text
    yield Region(exchange, a, b, c, patient, doc.json()["document_id"])
    for member in (a, b, c):
        await member.aclose()


# --- item 1: roles by organisation type; cross-domain search --------------------------------


async def test_roles_are_the_exchanges_decision_by_organisation_type(region: Region) -> None:
    r = region
    as_steward = await r.b.call("GET", "/api/v1/patients/search", params={"national_id": NATIONAL_ID}, as_user=STEWARD)
    assert (as_steward.status_code, as_steward.json()["error"]["reason"]) == (401, "role-not-allowed")
    assert "data-steward" in as_steward.json()["error"]["message"]
    authority = await r.exchange.member(type="authority", scopes="system/DocumentReference.rs system/Binary.r")
    as_doctor = await authority.call("GET", f"/api/v1/documents/{r.document_id}/content", as_user=DOCTOR)
    assert (as_doctor.status_code, as_doctor.json()["error"]["reason"]) == (401, "role-not-allowed")
    fhir = await authority.call("GET", f"/fhir/R4/Binary/{r.document_id}", as_user=DOCTOR)
    assert fhir.status_code == 401
    # The platform operator's staff are the data stewards.
    platform = await r.exchange.member(type="platform-admin", scopes="system/Patient.rs")
    steward = await platform.call(
        "GET", "/api/v1/patients/search", params={"national_id": r.patient["national_id"]}, as_user=STEWARD
    )
    assert steward.status_code == 200, steward.text
    # ... and even they get a search result, not a directory entry: the national id is masked.
    [found] = steward.json()["results"]
    assert r.patient["national_id"] not in str(found)
    for member in (authority, platform):
        await member.aclose()


async def test_cross_domain_search_picks_a_person_not_a_directory(region: Region) -> None:
    r = region
    # A birth date (or a name) alone lists strangers: refused.
    for params in (
        {"birth_date": r.patient["birth_date"]},
        {"name": "欧阳娜娜"},
        {"gender": "female", "birth_date": r.patient["birth_date"]},
    ):
        broad = await r.b.call("GET", "/api/v1/patients/search", params=params)
        assert (broad.status_code, broad.json()["error"]["reason"]) == (400, "search-too-broad"), params
    found = await r.b.call(
        "GET", "/api/v1/patients/search", params={"name": "欧阳娜娜", "birth_date": r.patient["birth_date"]}
    )
    assert found.status_code == 200, found.text
    [result] = [x for x in found.json()["results"] if x["patient"]["local_id"] == "LP-A"]
    shown = result["patient"]
    assert shown["name"] == "欧阳娜娜"  # enough to pick the right person
    assert r.patient["national_id"] not in str(found.json())
    assert [i["value"] for i in shown["identifiers"]]
    assert all("*" in i["value"] for i in shown["identifiers"])
    assert shown["phones"] == []
    assert shown["address"]["line"] == ""
    assert shown["address"]["district"] == "朝阳区"
    # FHIR PDQm the same.
    fhir = await r.b.call("GET", "/fhir/R4/Patient", params={"name": "欧阳娜娜", "birthdate": r.patient["birth_date"]})
    assert fhir.status_code == 200, fhir.text
    for clear in (r.patient["national_id"], "13912345678", "建国路"):
        assert clear not in fhir.text
    # A's own clinicians still see their own record in full.
    own = await r.a.call("GET", "/api/v1/patients/search", params={"national_id": r.patient["national_id"]})
    assert "13912345678" in own.text


async def test_cross_domain_results_are_capped(exchange: Exchange) -> None:
    a = await exchange.member(scopes=SCOPES)
    b = await exchange.member(scopes=SCOPES)
    for i in range(12):
        twin = {**person("李伟"), "birth_date": "1980-01-01", "gender": "male", "phones": [f"1391234{i:04d}"]}
        twin.pop("national_id")
        assert (await a.call("POST", "/api/v1/patients", json={"local_id": f"CAP-{i}", **twin})).status_code == 201
    seen: list[str] = []
    params: dict[str, Any] = {"name": "李伟", "birth_date": "1980-01-01", "limit": 5}
    for _ in range(5):
        page = await b.call("GET", "/api/v1/patients/search", params=params)
        assert page.status_code == 200, page.text
        seen += [x["patient"]["local_id"] for x in page.json()["results"]]
        if not page.json()["next_page_token"]:
            break
        params = {"page_token": page.json()["next_page_token"]}
    assert len(seen) == 10
    for member in (a, b):
        await member.aclose()


# --- item 2: care relationship -----------------------------------------------------------------


async def test_clinical_reads_need_a_care_relationship(region: Region) -> None:
    r = region
    # C holds no record of the person: no content, no metadata, whatever the clinical role.
    for user in (DOCTOR, Practitioner(id="T-1", name="技师", role="technician", department="检验科")):
        content = await r.c.call("GET", f"/api/v1/documents/{r.document_id}/content", as_user=user)
        assert (content.status_code, content.json()["error"]["reason"]) == (403, "consent-denied"), user.role
        entry = await r.c.call("GET", f"/api/v1/documents/{r.document_id}", as_user=user)
        assert entry.status_code == 403
        binary = await r.c.call("GET", f"/fhir/R4/Binary/{r.document_id}", as_user=user)
        assert binary.status_code == 403
        reference = await r.c.call("GET", f"/fhir/R4/DocumentReference/{r.document_id}", as_user=user)
        assert reference.status_code == 403
    # The everyday case: the patient's first visit to B registers them (national id from the
    # card), and B's doctor sees the shared history.
    visit = await r.b.call("POST", "/api/v1/patients", json={"local_id": "LP-B", **r.patient})
    assert (visit.status_code, visit.json()["link_method"]) == (201, "national-id")
    history = await r.b.call("GET", "/api/v1/documents", params={"patient_local_id": "LP-B"})
    assert [e["document_id"] for e in history.json()["entries"]] == [r.document_id]
    content = await r.b.call("GET", f"/api/v1/documents/{r.document_id}/content")
    assert content.status_code == 200
    assert (await r.b.call("GET", f"/fhir/R4/Binary/{r.document_id}")).status_code == 200


# --- item 3: claim types ------------------------------------------------------------------------


def _assertion(client: HospitalClient, **claims: Any) -> str:
    now = int(time.time())
    body = {
        "iss": client.client_id,
        "sub": "D-1",
        "aud": TOKEN_AUDIENCE,
        "iat": now,
        "exp": now + 120,
        "jti": str(uuid.uuid4()),
        "name": "王医生",
        "role": "doctor",
        "department": "急诊科",
        "purpose_of_use": "treatment",
        **claims,
    }
    jwk = public_jwk(client.key)
    public = {k: jwk[k] for k in ("kty", "crv", "x", "y", "n", "e") if k in jwk}
    return jwt.encode(body, client.key, algorithm=algorithm_for(client.key), headers={"kid": jwk["kid"], "jwk": public})


async def _search_with(exchange: Exchange, client: HospitalClient, assertion: str) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.get(
            f"{exchange.base_url}/api/v1/patients/search",
            params={"national_id": NATIONAL_ID},
            headers={"Authorization": f"Bearer {await client.access_token()}", "X-HIE-User-Assertion": assertion},
        )


async def test_user_assertion_claim_types_are_validated(region: Region) -> None:
    r = region
    cases = {
        "role": {"role": ["doctor", "admin"]},
        "purpose_of_use": {"purpose_of_use": {"treatment": True}},
        "name": {"name": ["王", "医生"]},
        "department": {"department": {"id": "急诊科"}},
        "sub": {"sub": ""},
    }
    for claim, claims in cases.items():
        response = await _search_with(r.exchange, r.b, _assertion(r.b, **claims))
        assert response.status_code == 401, (claim, response.text)
        assert response.json()["error"]["reason"] == "user-assertion"
        assert claim in response.json()["error"]["message"], claim


# --- item 8: lifetime and replay --------------------------------------------------------------


async def test_user_assertions_are_short_lived_and_used_once(region: Region) -> None:
    r = region
    once = _assertion(r.b)
    assert (await _search_with(r.exchange, r.b, once)).status_code == 200
    replayed = await _search_with(r.exchange, r.b, once)
    assert (replayed.status_code, replayed.json()["error"]["reason"]) == (401, "user-assertion-replayed")
    now = int(time.time())
    long_lived = _assertion(r.b, iat=now, exp=now + 900)
    assert (await _search_with(r.exchange, r.b, long_lived)).status_code == 401
    # The client of the repository signs one per request: repeated calls keep working.
    for _ in range(3):
        assert (
            await r.b.call("GET", "/api/v1/patients/search", params={"national_id": NATIONAL_ID})
        ).status_code == 200


# --- item 7: break-the-glass bound to the declaring role and department -----------------------


async def test_break_glass_is_bound_to_the_declaring_role_and_department(region: Region) -> None:
    r = region
    assert (await r.b.call("POST", "/api/v1/patients", json={"local_id": "LP-B", **r.patient})).status_code == 201
    deny = await r.a.call(
        "POST",
        "/api/v1/consent/directives",
        json={
            "patient_local_id": "LP-A",
            "policy_ids": ["urn:oid:2.16.156.10011.2.5.1"],
            "evidence_document_id": "consent-form-LP-1",
            "provision": {"type": "deny", "actors": [{"kind": "organization", "organization_id": r.b.org_id}]},  # type: ignore[attr-defined]
        },
    )
    assert deny.status_code == 201, deny.text
    declared = await r.b.call(
        "POST",
        "/api/v1/consent/break-glass",
        purpose="emergency",
        json={"patient_local_id": "LP-B", "reason": "患者昏迷送入急诊，需既往病史"},
    )
    assert declared.status_code == 201, declared.text
    url = f"/api/v1/documents/{r.document_id}/content"
    assert (await r.b.call("GET", url, purpose="emergency")).status_code == 200
    nurse = Practitioner(id=DOCTOR.id, name=DOCTOR.name, role="nurse", department=DOCTOR.department)
    assert (await r.b.call("GET", url, purpose="emergency", as_user=nurse)).status_code == 403
    elsewhere = Practitioner(id=DOCTOR.id, name=DOCTOR.name, role="doctor", department="放射科")
    assert (await r.b.call("GET", url, purpose="emergency", as_user=elsewhere)).status_code == 403


# --- item 4: notification endpoints -------------------------------------------------------------


async def test_numeric_hosts_and_the_exchanges_own_ports_are_refused_as_endpoints(region: Region) -> None:
    """The address the connection would use is what is checked: 2852039166, 0xa9fea9fe and
    169.254.43518 are all 169.254.169.254; a service's gRPC port on this machine is the
    exchange itself (loopback is allowed here only because the tests configure it)."""
    r = region
    expires = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)).isoformat()
    audit_port = r.exchange.services["audit"].port
    for endpoint in (
        "http://2852039166/latest/meta-data/",
        "http://0xa9fea9fe/latest/meta-data/",
        "http://169.254.43518/latest/meta-data/",
        f"http://127.0.0.1:{audit_port}/hie.audit.v1.AuditLog/Record",
        "http://127.0.0.1:7106/",
    ):
        refused = await r.b.call(
            "POST",
            "/api/v1/subscriptions",
            json={"topic": "workflow-state", "endpoint_url": endpoint, "expires": expires},
        )
        assert refused.status_code == 403, (endpoint, refused.text)
        assert refused.json()["error"]["reason"] == "endpoint-address-not-allowed"
    assert (await r.b.call("GET", "/api/v1/subscriptions")).json()["subscriptions"] == []


# --- item 6: page positions beyond 64 bits --------------------------------------------------


async def test_page_positions_beyond_64_bits_are_a_bad_request(region: Region) -> None:
    r = region
    auditor = Practitioner(id="AUD-B", name="院内审计", role="auditor", department="审计科")
    rest = await r.b.call(
        "GET",
        "/api/v1/audit/events",
        params={"page_token": "99999999999999999999999"},
        as_user=auditor,
        purpose="audit",
    )
    assert (rest.status_code, rest.json()["error"]["reason"]) == (400, "page-token")
    fhir = await r.b.call(
        "GET", "/fhir/R4/AuditEvent", params={"page": "9223372036854775808"}, as_user=auditor, purpose="audit"
    )
    assert fhir.status_code == 400, fhir.text
    assert fhir.json()["resourceType"] == "OperationOutcome"


# --- item 9: cross-tenant metadata ---------------------------------------------------------------


async def test_cross_tenant_metadata_is_refused_with_a_reason(region: Region) -> None:
    r = region
    # B registers a patient of its own, then tries to hand out A's document through its workflows.
    mine = person("令狐冲")
    assert (await r.b.call("POST", "/api/v1/patients", json={"local_id": "LP-B2", **mine})).status_code == 201
    a_patient = await r.a.call("GET", "/api/v1/patients/LP-A/cross-references")
    enterprise_id = a_patient.json()["enterprise_id"]
    referral = await r.b.call(
        "POST",
        "/api/v1/referrals",
        purpose="referral",
        json={
            "patient_local_id": "LP-B2",
            "target_organization_id": r.c.org_id,  # type: ignore[attr-defined]
            "direction": "up",
            "document_ids": [r.document_id],
        },
    )
    # B may not even read A's document: the referral service refuses it as not attachable.
    assert (referral.status_code, referral.json()["error"]["reason"]) == (400, "referral-documents"), referral.text
    consultation = await r.b.call(
        "POST",
        "/api/v1/consultations",
        purpose="consultation",
        json={
            "patient_local_id": "LP-B2",
            "consultant_organization_id": r.c.org_id,  # type: ignore[attr-defined]
            "kind": "imaging",
            "question": "胸片阴影性质待定",
            "document_ids": [r.document_id],
        },
    )
    # As for the referral: B may not read A's document, so the teleconsult service refuses it as
    # not attachable (a readable document of another organisation would be 422 document-not-own).
    assert (consultation.status_code, consultation.json()["error"]["reason"]) == (400, "consultation-documents"), (
        consultation.text
    )
    to_itself = await r.b.call(
        "POST",
        "/api/v1/referrals",
        purpose="referral",
        json={"patient_local_id": "LP-B2", "target_organization_id": r.b.org_id, "direction": "lateral"},  # type: ignore[attr-defined]
    )
    assert (to_itself.status_code, to_itself.json()["error"]["reason"]) == (400, "self-referral")
    consult_itself = await r.b.call(
        "POST",
        "/api/v1/consultations",
        purpose="consultation",
        json={
            "patient_local_id": "LP-B2",
            "consultant_organization_id": r.b.org_id,  # type: ignore[attr-defined]
            "kind": "imaging",
            "question": "胸片阴影性质待定",
        },
    )
    assert (consult_itself.status_code, consult_itself.json()["error"]["reason"]) == (400, "self-consultation")
    evidence = await r.b.call(
        "POST",
        "/api/v1/consent/directives",
        json={
            "patient_local_id": "LP-B2",
            "policy_ids": ["urn:oid:2.16.156.10011.2.5.1"],
            "evidence_document_id": r.document_id,
            "provision": {"type": "deny"},
        },
    )
    assert (evidence.status_code, evidence.json()["error"]["reason"]) == (422, "evidence-not-own"), evidence.text
    # B's auditor asks the exchange to explain a decision about A's patient, whom B never registered.
    auditor = Practitioner(id="AUD-B", name="院内审计", role="auditor", department="审计科")
    explained = await r.b.call(
        "POST",
        "/api/v1/consent/explain",
        purpose="audit",
        as_user=auditor,
        json={
            "enterprise_id": enterprise_id,
            "item": {"document_id": r.document_id, "source_organization_id": r.a.org_id},  # type: ignore[attr-defined]
            "organization_id": r.b.org_id,  # type: ignore[attr-defined]
        },
    )
    assert (explained.status_code, explained.json()["error"]["reason"]) == (404, "patient-not-found")
    assert "Consent/" not in explained.text
    # The same requests with B's own material are accepted.
    own = await r.b.call("POST", "/api/v1/documents", json=document("LP-B2", "门诊病历".encode()))
    accepted = await r.b.call(
        "POST",
        "/api/v1/referrals",
        purpose="referral",
        json={
            "patient_local_id": "LP-B2",
            "target_organization_id": r.c.org_id,  # type: ignore[attr-defined]
            "direction": "up",
            "document_ids": [own.json()["document_id"]],
        },
    )
    assert accepted.status_code == 201, accepted.text


async def test_the_authority_sees_registrations_followed_by_cross_domain_reads(region: Region) -> None:
    r = region
    started = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    assert (await r.b.call("POST", "/api/v1/patients", json={"local_id": "LP-B", **r.patient})).status_code == 201
    assert (await r.b.call("GET", f"/api/v1/documents/{r.document_id}/content")).status_code == 200
    assert (await r.a.call("GET", f"/api/v1/documents/{r.document_id}/content")).status_code == 200  # its own
    await r.exchange.audit_settled()
    authority = await r.exchange.member(type="authority", scopes="system/AuditEvent.rs", name="市卫健委")
    report = await authority.call(
        "GET",
        "/api/v1/audit/reports/registrations-then-reads",
        params={"since": started.isoformat()},
        purpose="audit",
    )
    assert report.status_code == 200, report.text
    rows = {row["organization_id"]: row for row in report.json()["organizations"]}
    b = rows[r.b.org_id]  # type: ignore[attr-defined]
    assert (b["registrations"], b["cross_domain_reads"], b["patients_without_prior_encounter"]) == (1, 1, 1)
    assert b["share_without_prior_encounter"] == 1.0
    a = rows[r.a.org_id]  # type: ignore[attr-defined]
    assert (a["registrations"], a["cross_domain_reads"]) == (1, 0)
    await authority.aclose()


# --- item 5: clinical free text encrypted at rest --------------------------------------------


async def test_referral_reason_and_consultation_question_are_encrypted_at_rest(region: Region) -> None:
    r = region
    reason = "疑似急性心肌梗死，肌钙蛋白升高，请上级医院介入治疗"
    question = "胸片右下肺阴影性质待定，请放射科会诊"
    referral = await r.a.call(
        "POST",
        "/api/v1/referrals",
        purpose="referral",
        json={
            "patient_local_id": "LP-A",
            "target_organization_id": r.b.org_id,  # type: ignore[attr-defined]
            "direction": "up",
            "reason": reason,
            "document_ids": [r.document_id],
        },
    )
    assert referral.status_code == 201, referral.text
    consultation = await r.a.call(
        "POST",
        "/api/v1/consultations",
        purpose="consultation",
        json={
            "patient_local_id": "LP-A",
            "consultant_organization_id": r.b.org_id,  # type: ignore[attr-defined]
            "kind": "imaging",
            "question": question,
        },
    )
    assert consultation.status_code == 201, consultation.text
    # The parties read them back in clear.
    got = await r.a.call("GET", f"/api/v1/referrals/{referral.json()['referral_id']}", purpose="referral")
    assert got.json()["reason"] == reason
    asked = await r.a.call(
        "GET", f"/api/v1/consultations/{consultation.json()['consultation_id']}", purpose="consultation"
    )
    assert asked.json()["question"] == question
    # The databases hold ciphertext only: the text is in no column of the row, which does hold a
    # field-encrypted value (e1:…).
    for service, table, text in (
        ("referral", "referral", reason),
        ("teleconsult", "consultation", question),
    ):
        runtime = r.exchange.services[service].runtime
        async with runtime.engine.connect() as conn:
            rows = [tuple(row) for row in await conn.exec_driver_sql(f"SELECT * FROM {table}")]  # noqa: S608
        assert rows
        values = [str(value) for row in rows for value in row if value is not None]
        assert not any(text in value for value in values)
        assert any(value.startswith("e1:") for value in values)
        if r.exchange.backend == "sqlite":
            path = r.exchange.settings.data_dir / f"{service}.db"
            assert path.stat().st_mode & 0o777 == 0o600
            for file in (path, path.with_name(path.name + "-wal")):
                if file.exists():
                    assert text.encode() not in file.read_bytes()
                    assert file.stat().st_mode & 0o777 == 0o600


# --- item 10: the API contract -----------------------------------------------------------------


async def test_openapi_declares_error_responses_and_fhir_media_and_405_names_allowed_methods(
    exchange: Exchange,
) -> None:
    async with httpx.AsyncClient() as http:
        schema = (await http.get(f"{exchange.base_url}/openapi.json")).json()
        not_allowed = await http.delete(f"{exchange.base_url}/api/v1/patients/search")
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            assert {"400", "401", "403", "404", "422"} <= set(operation["responses"]), (method, path)
    search = schema["paths"]["/api/v1/patients/search"]["get"]["responses"]
    assert search["422"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    fhir = schema["paths"]["/fhir/R4/Patient"]["get"]["responses"]
    assert "application/fhir+json" in fhir["200"]["content"]
    assert "application/fhir+json" in fhir["404"]["content"]
    assert not_allowed.status_code == 405
    assert "GET" in not_allowed.headers["allow"]


async def test_a_directive_period_before_the_first_instant_is_a_bad_request(region: Region) -> None:
    """Found by the schemathesis run: a period start at 0001-01-01 in a zone east of UTC cannot be
    converted (OverflowError) — 400, not 500."""
    revised = await r_put(region)
    assert (revised.status_code, revised.json()["error"]["reason"]) == (400, "date-invalid"), revised.text


async def r_put(r: Region) -> httpx.Response:
    return await r.a.call(
        "POST",
        "/api/v1/consent/directives",
        json={
            "patient_local_id": "LP-A",
            "policy_ids": ["urn:oid:2.16.156.10011.2.5.1"],
            "evidence_document_id": "consent-form-LP-2",
            "provision": {"type": "deny"},
            "period": {"start": "0001-01-01T00:00:00+01:00"},
        },
    )


async def test_an_expected_revision_beyond_int32_is_a_bad_request(region: Region) -> None:
    """Found by the schemathesis run: expected_revision 2**31 overflowed the RPC's int32 (500)."""
    revised = await region.a.call(
        "PUT",
        f"/api/v1/consent/directives/{uuid.uuid4()}",
        json={"provision": {"type": "deny"}, "expected_revision": 2**31},
    )
    assert (revised.status_code, revised.json()["error"]["reason"]) == (400, "invalid-request"), revised.text
