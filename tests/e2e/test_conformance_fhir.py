"""FHIR conformance, driven as a hospital's integration engineer drives the exchange: authlib's
`private_key_jwt` client for the token (discovered at the FHIR base), the fhirpy client for
search, paging, read and count, and every FHIR response validated with the fhir.resources R4B
models plus the JSON-FHIR rules (tests/fhir_rules.py). Issue 16, items 1-6."""

from __future__ import annotations

import base64
import datetime
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from authlib.integrations.httpx_client import AsyncOAuth2Client
from authlib.oauth2.rfc7523 import PrivateKeyJWT
from fhirpy import AsyncFHIRClient
from joserfc.jwk import ECKey

from gateway.client import FreshUserAssertionHeaders, HospitalClient
from services.shared import gb11643
from services.shared.keys import private_pem, public_jwk
from tests.conftest import Exchange
from tests.support.factories import fresh_national_id, person
from tests.support.fhir_rules import check_fhir

SCOPES = "system/Patient.crus system/DocumentReference.crs system/Consent.crs system/AuditEvent.rs"


async def authlib_token(hospital: HospitalClient) -> str:
    """A SMART Backend Services token as authlib gets it, from discovery at the FHIR base."""
    async with httpx.AsyncClient() as http:
        discovery = await http.get(f"{hospital.base_url}/fhir/R4/.well-known/smart-configuration")
    assert discovery.status_code == 200, discovery.text
    config = discovery.json()
    endpoint = config["token_endpoint"]
    # authlib signs `exp` an hour ahead unless told; SMART servers take at most five minutes.
    auth = PrivateKeyJWT(
        endpoint,
        alg="ES384",
        claims={"exp": int(time.time()) + 240, "jti": str(uuid.uuid4())},
        headers={"kid": public_jwk(hospital.key)["kid"]},
    )
    key = ECKey.import_key(private_pem(hospital.key))
    async with AsyncOAuth2Client(
        client_id=hospital.client_id, client_secret=key, token_endpoint_auth_method=auth, scope=hospital.scopes
    ) as oauth:
        token = await oauth.fetch_token(endpoint, grant_type="client_credentials")
    return str(token["access_token"])


@dataclass
class Hospital:
    """One member hospital's FHIR tooling: fhirpy for the FHIR API, httpx for the raw checks."""

    client: HospitalClient
    fhir: AsyncFHIRClient
    headers: FreshUserAssertionHeaders
    org_id: str

    @property
    def base(self) -> str:
        return self.client.base_url

    async def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.client.http.get(f"{self.base}/fhir/R4/{path}", headers=self.headers, **kwargs)

    async def send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        return await self.client.http.request(method, f"{self.base}/fhir/R4/{path}", headers=headers, **kwargs)

    async def status_of(self, path: str) -> int:
        return (await self.get(path)).status_code

    async def checked(self, response: httpx.Response, status: int = 200) -> dict[str, Any]:
        """The response's resource after checking its status, media type and FHIR validity."""
        assert response.status_code == status, response.text
        assert response.headers["content-type"].startswith("application/fhir+json")
        body: dict[str, Any] = response.json()
        await check_fhir(body, base=self.base, read=self.status_of)
        return body

    async def feed(self, local_id: str, name: str, family: str, given: str, **demographics: Any) -> str:
        """Add a patient by the ITI-104 feed; its Patient id (from Location)."""
        who = person(name, **demographics)
        patient = {
            "resourceType": "Patient",
            "identifier": [
                {"system": f"urn:hie:patient-id:{self.org_id}", "value": local_id},
                {"system": "urn:hie:identifier:cn-resident-id", "value": who["national_id"]},
            ],
            "name": [{"family": family, "given": [given], "text": name}],
            "gender": who["gender"],
            "birthDate": who["birth_date"],
        }
        response = await self.send(
            "PUT",
            "Patient",
            params={"identifier": f"urn:hie:patient-id:{self.org_id}|{local_id}"},
            json=patient,
        )
        await self.checked(response, 201)
        return response.headers["location"].rsplit("/", 1)[1]


async def hospital(exchange: Exchange, name: str) -> Hospital:
    client = await exchange.member(name=name, scopes=SCOPES)
    token = await authlib_token(client)
    # A user assertion is taken once: every request (fhirpy's too) reads a newly signed one.
    headers = FreshUserAssertionHeaders(
        key=client.key, client_id=client.client_id, practitioner=client.practitioner, purpose="treatment", token=token
    )
    fhir = AsyncFHIRClient(f"{client.base_url}/fhir/R4", authorization=headers["Authorization"], extra_headers=headers)
    return Hospital(client=client, fhir=fhir, headers=headers, org_id=client.org_id)  # type: ignore[attr-defined]


@pytest.fixture
async def hospitals(exchange: Exchange) -> AsyncIterator[tuple[Hospital, Hospital]]:
    a, b = await hospital(exchange, "省人民医院"), await hospital(exchange, "区中心医院")
    yield a, b
    await a.client.aclose()
    await b.client.aclose()


def provide_bundle(subject: dict[str, Any], content: bytes, *, master: str) -> dict[str, Any]:
    binary_url = f"urn:uuid:{uuid.uuid4()}"
    reference = {
        "resourceType": "DocumentReference",
        "masterIdentifier": {"system": "urn:ietf:rfc:3986", "value": master},
        "status": "current",
        "type": {"coding": [{"system": "http://loinc.org", "code": "18842-5", "display": "出院小结"}]},
        "subject": subject,
        "date": "2026-11-20T10:00:00+08:00",
        "description": "出院小结",
        "content": [{"attachment": {"contentType": "text/plain", "language": "zh-CN", "url": binary_url}}],
    }
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": reference,
                "request": {"method": "POST", "url": "DocumentReference"},
            },
            {
                "fullUrl": binary_url,
                "resource": {
                    "resourceType": "Binary",
                    "contentType": "text/plain",
                    "data": base64.b64encode(content).decode(),
                },
                "request": {"method": "POST", "url": "Binary"},
            },
        ],
    }


def _oid() -> str:
    return f"urn:oid:1.2.156.112604.{secrets.randbelow(10**9)}"


# --- 1. SMART discovery -------------------------------------------------------------------------


async def test_smart_discovery_at_the_fhir_base_declares_permission_v2(hospitals) -> None:
    a, _ = hospitals
    async with httpx.AsyncClient() as http:
        at_base = await http.get(f"{a.base}/fhir/R4/.well-known/smart-configuration")
        at_root = await http.get(f"{a.base}/.well-known/smart-configuration")
    assert at_base.status_code == 200
    assert at_base.json() == at_root.json()
    config = at_base.json()
    assert {"permission-v2", "client-confidential-asymmetric"} <= set(config["capabilities"])
    assert "system/Patient.rs" in config["scopes_supported"] or any(
        s.startswith("system/Patient.") for s in config["scopes_supported"]
    )
    # The token authlib fetched (fixture) works with fhirpy.
    metadata = await a.fhir.execute("metadata", method="get")
    await a.checked(await a.get("metadata"))
    assert metadata["resourceType"] == "CapabilityStatement"


# --- 2. PDQm --------------------------------------------------------------------------------------


async def test_pdqm_id_format_and_count_with_fhirpy(hospitals) -> None:
    a, _ = hospitals
    family = "欧阳"
    local = f"PDQ-{secrets.token_hex(3)}"
    first = await a.feed(f"{local}-1", "欧阳明华", family, "明华")
    second = await a.feed(f"{local}-2", "欧阳明远", family, "明远")

    # _id (a PDQm Supplier SHALL support it), through fhirpy's search and get.
    found = await a.fhir.resources("Patient").search(_id=first).fetch()
    assert [p.id for p in found] == [first]
    assert (await a.fhir.resources("Patient").search(_id=f"{first},{second}").count()) == 2
    got = await a.fhir.resources("Patient").search(_id=second).get()
    assert got.id == second
    read = await a.fhir.reference("Patient", first).to_resource()
    assert read["name"][0]["family"] == family
    await a.checked(await a.get("Patient", params={"_id": first}))
    nothing = await a.checked(await a.get("Patient", params={"_id": str(uuid.uuid4())}))
    assert nothing["total"] == 0
    assert "entry" not in nothing

    # _format=json is JSON; _count=0 and _summary=count are the total only; fhirpy's count() works.
    as_json = await a.checked(await a.get("Patient", params={"_id": first, "_format": "json"}))
    assert as_json["entry"][0]["resource"]["id"] == first
    search = {"name": "欧阳明华", "birthdate": read["birthDate"]}
    assert await a.fhir.resources("Patient").search(**search).count() >= 1
    for summary in ({"_count": "0"}, {"_summary": "count"}):
        counted = await a.checked(await a.get("Patient", params={**search, **summary}))
        assert counted["total"] >= 1
        assert "entry" not in counted


def _born_on(born: datetime.date) -> str:
    """A resident id (valid check digit) of someone born that day."""
    body = f"110105{born:%Y%m%d}{secrets.randbelow(1000):03d}"
    return body + gb11643.check_digit(body)


async def test_pdqm_family_is_a_prefix_match_with_exact_and_contains(hospitals) -> None:
    a, b = hospitals
    # One birth date for all: a name (or a prefix of one) alone is too broad to search the region.
    born = datetime.date(1950, 1, 1) + datetime.timedelta(days=secrets.randbelow(365 * 50))
    local = f"PFX-{secrets.token_hex(3)}"
    yi = await a.feed(f"{local}-1", "司马懿", "司马", "懿", national_id=_born_on(born))
    zhao = await a.feed(f"{local}-2", "司马昭", "司马", "昭", national_id=_born_on(born))
    situ = await b.feed(f"B-{local}-3", "司徒雷", "司徒", "雷", national_id=_born_on(born))
    muller = await a.feed(f"{local}-4", "Hans Müller", "Müller", "Hans", national_id=_born_on(born))
    ids = {yi, zhao}
    day = born.isoformat()

    async def found(**params: str) -> set[str]:
        page = await a.checked(await a.get("Patient", params={"birthdate": day, **params}))
        return {e["resource"]["id"] for e in page.get("entry", [])}

    patients = a.fhir.resources("Patient")
    assert {p.id for p in await patients.search(family="司马", birthdate=day).fetch_all()} == ids
    # FHIR string search: a prefix by default, on the characters or the toneless pinyin, case- and
    # accent-insensitive; across domains (司徒雷 is hospital b's).
    assert {p.id for p in await patients.search(family="司", birthdate=day).fetch_all()} == ids | {situ}
    assert await found(family="si") == ids | {situ}
    assert await found(family="SIMA") == ids
    assert await found(family="mul") == {muller}
    assert await found(given="昭") == {zhao}
    assert await found(given="zh") == {zhao}
    assert await found(name="司马") == ids
    assert await found(name="hans") == {muller}
    # :exact is the whole part as registered (case-sensitive); :contains a substring anywhere.
    assert await found(**{"family:exact": "司"}) == set()
    assert await found(**{"family:exact": "司马"}) == ids
    assert await found(**{"family:exact": "müller"}) == set()
    assert await found(**{"family:exact": "Müller"}) == {muller}
    assert await found(**{"name:exact": "司马昭"}) == {zhao}
    assert await found(**{"family:contains": "马"}) == ids
    assert await found(**{"family:contains": "MA"}) == ids
    assert await found(**{"family:contains": "ll"}) == {muller}
    assert await found(**{"given:contains": "懿"}) == {yi}
    assert await found(**{"name:contains": "徒雷"}) == {situ}
    # fhirpy's modifier form (family__contains -> family:contains), paged one by one: the sealed
    # page token carries the modifier.
    paged = patients.search(family__contains="马", birthdate=day).limit(1)
    assert {p.id async for p in paged} == ids
    assert await patients.search(family__exact="司马", birthdate=day).count() == 2

    # Another domain's records stay masked (issue 24): no phone, national id masked.
    theirs = await a.checked(await a.get("Patient", params={"family": "司", "birthdate": day}))
    for entry in theirs["entry"]:
        if entry["resource"]["id"] == situ:
            assert "telecom" not in entry["resource"]
            assert all("*" in i["value"] for i in entry["resource"]["identifier"] if "resident-id" in i["system"])

    # A name prefix alone is still too broad; an unsupported modifier, or a name parameter given
    # twice (with and without a modifier), is refused.
    for params, reason in (
        ({"family": "司"}, "search-too-broad"),
        ({"family:exact": "司马"}, "search-too-broad"),
        ({"family:missing": "true", "birthdate": day}, "search-parameter-unknown"),
        ({"family:text": "司", "birthdate": day}, "search-parameter-unknown"),
        ({"family": "司", "family:exact": "司马", "birthdate": day}, "search-parameter-repeated"),
    ):
        refused = await a.get("Patient", params=params)
        outcome = await a.checked(refused, 400)
        assert reason in json.dumps(outcome), (params, outcome)


async def test_rest_patient_search_names_by_prefix_exact_and_contains(hospitals) -> None:
    a, _ = hospitals
    born = datetime.date(1950, 1, 1) + datetime.timedelta(days=secrets.randbelow(365 * 50))
    local = f"RPX-{secrets.token_hex(3)}"
    feng, zhangsan = f"{local}-1", f"{local}-2"
    await a.feed(feng, "张三丰", "张", "三丰", national_id=_born_on(born))
    await a.feed(zhangsan, "张三", "张", "三", national_id=_born_on(born))

    async def found(**params: str) -> set[str]:
        response = await a.client.call(
            "GET", "/api/v1/patients/search", params={"birth_date": born.isoformat(), **params}
        )
        assert response.status_code == 200, response.text
        return {r["patient"]["local_id"] for r in response.json()["results"]}

    assert await found(family="张") == {feng, zhangsan}
    assert await found(family="zhang") == {feng, zhangsan}
    assert await found(name="张三") == {feng, zhangsan}
    assert await found(name="张三", name_match="exact") == {zhangsan}
    assert await found(given="丰", name_match="contains") == {feng}
    assert await found(given="feng", name_match="contains") == {feng}
    too_broad = await a.client.call("GET", "/api/v1/patients/search", params={"family": "张"})
    assert too_broad.status_code == 400
    assert too_broad.json()["error"]["reason"] == "search-too-broad"
    bad = await a.client.call(
        "GET", "/api/v1/patients/search", params={"family": "张", "birth_date": born.isoformat(), "name_match": "x"}
    )
    assert bad.status_code in (400, 422)
    # The FHIR spelling on the REST route: refused by name, not run as a search without it.
    misspelt = await a.client.call(
        "GET", "/api/v1/patients/search", params={"family": "张", "birthdate": born.isoformat()}
    )
    assert misspelt.status_code == 400
    assert misspelt.json()["error"]["reason"] == "search-param-unknown"
    assert "'birthdate'" in misspelt.json()["error"]["message"]


# --- 3 and 4. One identifier system, Patient ids the exchange hands out ------------------------------


async def test_documents_and_consent_take_the_patient_ids_the_exchange_hands_out(hospitals) -> None:
    a, b = hospitals
    local = f"REF-{secrets.token_hex(3)}"
    national_id = fresh_national_id()
    own = await a.feed(local, "上官婉儿", "上官", "婉儿", national_id=national_id)
    theirs = await b.feed(f"B-{local}", "上官婉儿", "上官", "婉儿", national_id=national_id)

    # ITI-65 with the subject as Patient/<id> and as the absolute URL of that Patient.
    for subject in ({"reference": f"Patient/{own}"}, {"reference": f"{a.base}/fhir/R4/Patient/{own}"}):
        provided = await a.checked(
            await a.send("POST", "", json=provide_bundle(subject, "出院小结".encode(), master=_oid()))
        )
        assert provided["entry"][0]["response"]["status"] == "201 Created"
    # Another hospital's record, an unknown id, a local id as if it were an id: 404.
    for subject in (f"Patient/{theirs}", f"Patient/{uuid.uuid4()}", f"Patient/{local}"):
        refused = await a.send("POST", "", json=provide_bundle({"reference": subject}, b"x", master=_oid()))
        assert refused.status_code == 404, refused.text
        await a.checked(refused, 404)

    # ITI-67 by Patient/<id> (fhirpy paging over pages of one), by absolute URL, by identifier.
    pages = a.fhir.resources("DocumentReference").search(patient=f"Patient/{own}").limit(1)
    documents = [d async for d in pages]
    assert len(documents) == 2
    for document in documents:
        await check_fhir(document.serialize(), base=a.base, read=a.status_of)
    assert await a.fhir.resources("DocumentReference").search(patient=f"Patient/{own}").count() == 2
    by_url = await a.checked(await a.get("DocumentReference", params={"patient": f"{a.base}/fhir/R4/Patient/{own}"}))
    assert len(by_url["entry"]) == 2
    for system in (f"urn:hie:patient-id:{a.org_id}", f"urn:hie:patient:{a.org_id}"):
        by_identifier = await a.checked(
            await a.get("DocumentReference", params={"patient.identifier": f"{system}|{local}"})
        )
        assert len(by_identifier["entry"]) == 2
    counted = await a.checked(
        await a.get("DocumentReference", params={"patient": f"Patient/{own}", "_summary": "count"})
    )
    assert counted["total"] == 2
    assert "entry" not in counted
    # b's own record of the same person finds a's documents; a's record id does not work for b.
    assert await b.fhir.resources("DocumentReference").search(patient=f"Patient/{theirs}").count() == 2
    assert (await b.get("DocumentReference", params={"patient": f"Patient/{own}"})).status_code == 404

    # Consent: Patient/<id> in, the one identifier system out.
    evidence = documents[0].id
    consent = {
        "resourceType": "Consent",
        "status": "active",
        "scope": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{own}"},
        "policy": [{"uri": "urn:oid:2.16.156.10011.2.5.1"}],
        "sourceReference": {"reference": f"DocumentReference/{evidence}"},
        "provision": {"type": "permit"},
    }
    created = await a.checked(await a.send("POST", "Consent", json=consent), 201)
    assert created["patient"]["identifier"] == {"system": f"urn:hie:patient-id:{a.org_id}", "value": local}
    searched = await a.checked(await a.get("Consent", params={"patient": f"Patient/{own}"}))
    assert [e["resource"]["id"] for e in searched["entry"]] == [created["id"]]

    # The CapabilityStatement names the one system.
    statement = (await a.get("metadata")).text
    assert "urn:hie:patient-id:" in statement


async def test_one_patient_identifier_system_everywhere(hospitals) -> None:
    a, _ = hospitals
    local = f"SYS-{secrets.token_hex(3)}"
    system = f"urn:hie:patient-id:{a.org_id}"  # as on Patient, PIXm and the ITI-104 feed
    await a.feed(local, "东方朔", "东方", "朔")
    subject = {"identifier": {"system": system, "value": local}}
    provided = await a.checked(await a.send("POST", "", json=provide_bundle(subject, b"summary", master=_oid())))
    document = provided["entry"][0]["response"]["location"]
    found = await a.checked(await a.get("DocumentReference", params={"patient.identifier": f"{system}|{local}"}))
    assert [f"DocumentReference/{e['resource']['id']}" for e in found["entry"]] == [document]
    consent = {
        "resourceType": "Consent",
        "status": "active",
        "scope": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": subject,
        "policy": [{"uri": "urn:oid:2.16.156.10011.2.5.1"}],
        "sourceReference": {"reference": document},
        "provision": {"type": "permit"},
    }
    created = await a.checked(await a.send("POST", "Consent", json=consent), 201)
    assert created["patient"]["identifier"] == {"system": system, "value": local}
    statement = await a.checked(await a.get("metadata"))
    documentation = json.dumps(statement, ensure_ascii=False)
    assert "urn:hie:patient-id:" in documentation
    assert "urn:hie:patient:<" not in documentation.replace("urn:hie:patient:<organisation> is still accepted", "")


# --- 5. MHD ITI-65: XDS metadata round-trips -------------------------------------------------------


async def test_provided_xds_metadata_round_trips(hospitals) -> None:
    a, _ = hospitals
    local = f"XDS-{secrets.token_hex(3)}"
    await a.feed(local, "欧阳修", "欧阳", "修")
    master = _oid()
    bundle = provide_bundle({"identifier": {"value": local}}, "出院小结".encode(), master=master)
    reference = bundle["entry"][0]["resource"]
    cda = {"system": "urn:ihe:iti:xds:2017:mimeTypeSufficient", "code": "urn:ihe:iti:xds:2017:mimeTypeSufficient"}
    facility = {"system": "http://snomed.info/sct", "code": "22232009", "display": "Hospital"}
    setting = {"system": "http://snomed.info/sct", "code": "394802001", "display": "General medicine"}
    reference["content"][0]["format"] = cda
    reference["context"] = {"facilityType": {"coding": [facility]}, "practiceSetting": {"coding": [setting]}}
    provided = await a.checked(await a.send("POST", "", json=bundle))
    document = await a.checked(await a.get(provided["entry"][0]["response"]["location"]))
    assert document["masterIdentifier"] == {"system": "urn:ietf:rfc:3986", "value": master}
    assert document["content"][0]["format"] == cda
    assert document["context"]["facilityType"] == {"coding": [facility]}
    assert document["context"]["practiceSetting"] == {"coding": [setting]}
    found = await a.fhir.resources("DocumentReference").search(**{"patient.identifier": local}).fetch()
    assert [d.serialize()["context"]["practiceSetting"] for d in found] == [{"coding": [setting]}]


async def test_the_submission_set_is_stored_and_found_by_iti_66(hospitals) -> None:
    a, b = hospitals
    local = f"LST-{secrets.token_hex(3)}"
    national_id = fresh_national_id()
    own = await a.feed(local, "慕容复", "慕容", "复", national_id=national_id)
    theirs = await b.feed(f"B-{local}", "慕容复", "慕容", "复", national_id=national_id)
    first = provide_bundle({"identifier": {"value": local}}, "出院小结".encode(), master=_oid())
    second = provide_bundle({"identifier": {"value": local}}, "检验报告".encode(), master=_oid())
    unique = _oid()
    designation = {"system": "http://loinc.org", "code": "34133-9", "display": "Summary of episode note"}
    submission_set = {
        "resourceType": "List",
        "extension": [
            {
                "url": "https://profiles.ihe.net/ITI/MHD/StructureDefinition/ihe-designationType",
                "valueCodeableConcept": {"coding": [designation]},
            }
        ],
        "identifier": [{"use": "usual", "system": "urn:ietf:rfc:3986", "value": unique}],
        "status": "current",
        "mode": "working",
        "title": "出院资料",
        "code": {
            "coding": [{"system": "https://profiles.ihe.net/ITI/MHD/CodeSystem/MHDlistTypes", "code": "submissionset"}]
        },
        "subject": {"identifier": {"value": local}},
        "date": "2026-11-20T10:00:00+08:00",
        "entry": [
            {"item": {"reference": first["entry"][0]["fullUrl"]}},
            {"item": {"reference": second["entry"][0]["fullUrl"]}},
        ],
    }
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": submission_set,
                "request": {"method": "POST", "url": "List"},
            },
            *first["entry"],
            *second["entry"],
        ],
    }
    provided = await a.checked(await a.send("POST", "", json=bundle))
    list_location = provided["entry"][0]["response"]["location"]
    assert list_location.startswith("List/")
    documents = [
        e["response"]["location"] for e in provided["entry"][1:] if e["response"]["location"].startswith("Doc")
    ]
    again = await a.checked(await a.send("POST", "", json=bundle))
    assert again["entry"][0]["response"] == {"status": "200 OK", "location": list_location}

    # ITI-66 with fhirpy, by the Patient id and by the identifier; the members resolve.
    lists = await a.fhir.resources("List").search(patient=f"Patient/{own}", code="submissionset").fetch_all()
    assert [f"List/{item.id}" for item in lists] == [list_location]
    found = lists[0].serialize()
    await check_fhir(found, base=a.base, read=a.status_of)
    assert {"use": "usual", "system": "urn:ietf:rfc:3986", "value": unique} in found["identifier"]
    assert found["title"] == "出院资料"
    assert found["extension"][0]["valueCodeableConcept"] == {"coding": [designation]}
    assert [e["item"]["reference"] for e in found["entry"]] == documents
    by_identifier = await a.checked(
        await a.get("List", params={"patient.identifier": f"urn:hie:patient-id:{a.org_id}|{local}"})
    )
    assert [e["resource"]["id"] for e in by_identifier["entry"]] == [lists[0].id]
    # The other hospital finds it through its own record of the person.
    assert [item.id for item in await b.fhir.resources("List").search(patient=f"Patient/{theirs}").fetch_all()] == [
        lists[0].id
    ]
    folders = await a.checked(await a.get("List", params={"patient": f"Patient/{own}", "code": "folder"}))
    assert "entry" not in folders


# --- 6. JSON-FHIR rules -----------------------------------------------------------------------------


async def test_json_fhir_rules_the_models_do_not_check(hospitals, exchange: Exchange) -> None:
    a, _ = hospitals
    local = f"RUL-{secrets.token_hex(3)}"
    own = await a.feed(local, "诸葛亮", "诸葛", "亮")
    # (The local-id forms, as they worked before: this test is about the JSON-FHIR rules alone.)
    provided = await a.send("POST", "", json=provide_bundle({"identifier": {"value": local}}, b"note", master=_oid()))
    await a.checked(provided)

    # ppc-1: a Consent needs policy or policyRule.
    consent = {
        "resourceType": "Consent",
        "status": "active",
        "scope": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"identifier": {"value": local}},
        "sourceReference": {"reference": provided.json()["entry"][0]["response"]["location"]},
        "provision": {"type": "permit"},
    }
    refused = await a.send("POST", "Consent", json=consent)
    assert (await a.checked(refused, 400))["issue"][0]["details"]["coding"][0]["code"] == "consent-policy-missing"
    ruled = await a.checked(
        await a.send(
            "POST",
            "Consent",
            json={**consent, "policyRule": {"coding": [{"system": "urn:hie:consent-policy", "code": "region"}]}},
        ),
        201,
    )
    assert "policy" not in ruled

    # An empty searchset has no entry.
    for path, params in (
        ("DocumentReference", {"patient.identifier": local, "status": "superseded"}),
        ("Patient", {"name": "无此人", "birthdate": "1900-01-01"}),
    ):
        empty = await a.checked(await a.get(path, params=params))
        assert "entry" not in empty

    # AuditEvent references resolve (the patient is an identifier, documents are readable).
    await exchange.audit_settled()
    auditor = await exchange.member(type="authority")
    events = await auditor.call(
        "GET", "/fhir/R4/AuditEvent", params={"agent": a.client.practitioner.id, "_count": "50"}
    )
    assert events.status_code == 200
    bundle = events.json()
    await check_fhir(bundle, base=a.base)
    for entity in [e for entry in bundle.get("entry", []) for e in entry["resource"].get("entity", [])]:
        reference = entity["what"].get("reference", "")
        assert not reference.startswith("Patient/"), "an enterprise id is not a Patient id"
    await auditor.aclose()

    # XML is not served: 406 with an OperationOutcome, by Accept and by _format.
    for response in (
        await a.send("GET", f"Patient/{own}", headers={"Accept": "application/fhir+xml"}),
        await a.get(f"Patient/{own}", params={"_format": "xml"}),
        await a.send("GET", "metadata", headers={"Accept": "application/fhir+xml"}),
    ):
        outcome = await a.checked(response, 406)
        assert outcome["resourceType"] == "OperationOutcome"
    # A Binary still negotiates the document's own type.
    binary = provided.json()["entry"][1]["response"]["location"]
    content = await a.send("GET", binary, headers={"Accept": "text/plain"})
    assert content.status_code == 200
    assert content.content == b"note"


# --- Incoming resources parsed with the R4B models -----------------------------------------------


async def test_incoming_resources_get_element_level_errors(hospitals) -> None:
    a, _ = hospitals
    local = f"VAL-{secrets.token_hex(3)}"
    await a.feed(local, "令狐冲", "令狐", "冲")

    def expressions(outcome: dict[str, Any]) -> set[str]:
        return {e for issue in outcome["issue"] for e in issue.get("expression", [])}

    bundle = provide_bundle({"identifier": {"value": local}}, b"x", master=_oid())
    bundle["entry"][0]["resource"]["date"] = "20.11.2026"
    bundle["entry"][0]["resource"]["author"] = {"display": "not a list"}
    refused = await a.checked(await a.send("POST", "", json=bundle), 400)
    assert {
        "Bundle.entry[0].resource.date",
        "Bundle.entry[0].resource.author",
    } <= expressions(refused)
    assert "20.11.2026" not in json.dumps(refused)

    consent = {
        "resourceType": "Consent",
        "status": "active",
        "scope": {"text": "privacy"},
        "category": [{"text": "consent"}],
        "patient": {"identifier": {"value": local}},
        "policy": [{"uri": "urn:oid:2.16.156.10011.2.5.1"}],
        "provision": {"type": "permit", "period": {"start": "yesterday"}, "colour": "blue"},
    }
    refused = await a.checked(await a.send("POST", "Consent", json=consent), 400)
    assert {"Consent.provision.period.start", "Consent.provision.colour"} <= expressions(refused)

    patient = {
        "resourceType": "Patient",
        "identifier": [{"system": f"urn:hie:patient-id:{a.org_id}", "value": local}],
        "name": [{"family": "令狐", "given": "冲"}],
        "birthDate": "1990-02-30x",
    }
    feed = await a.send("PUT", "Patient", params={"identifier": f"urn:hie:patient-id:{a.org_id}|{local}"}, json=patient)
    refused = await a.checked(feed, 400)
    assert {"Patient.name[0].given", "Patient.birthDate"} <= expressions(refused)

    parameters = {
        "resourceType": "Parameters",
        "parameter": [{"name": "resource", "resource": {"resourceType": "Patient", "gender": 1, "nickname": "冲"}}],
    }
    refused = await a.checked(await a.send("POST", "Patient/$match", json=parameters), 400)
    assert "Parameters.parameter[0].resource.nickname" in expressions(refused)
