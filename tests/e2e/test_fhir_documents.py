"""The FHIR document facade over HTTP: MHD ITI-65 provide-document transaction, ITI-67
DocumentReference search with paging, read, ITI-68 Binary, OperationOutcome errors."""

from __future__ import annotations

import base64
import hashlib
import secrets
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.client import HospitalClient
from tests.conftest import Exchange
from tests.support.factories import person

CDA = (
    "<ClinicalDocument xmlns='urn:hl7-org:v3'><title>出院小结</title>"
    "<text>患者好转出院，嘱门诊随访。</text></ClinicalDocument>"
).encode()


def provide_bundle(local_id: str, content: bytes, *, master: str = "", **document: Any) -> dict[str, Any]:
    binary_url = f"urn:uuid:{uuid.uuid4()}"
    reference = {
        "resourceType": "DocumentReference",
        "masterIdentifier": {
            "system": "urn:ietf:rfc:3986",
            "value": master or f"urn:oid:1.2.156.{secrets.randbelow(10**9)}",
        },
        "status": "current",
        "type": {"coding": [{"system": "http://loinc.org", "code": "18842-5", "display": "出院小结"}]},
        # The hospital's local id (the identifier system may be left out for the caller's own).
        "subject": {"identifier": {"value": local_id}},
        "date": "2026-11-20T10:00:00+08:00",
        "description": "出院小结",
        "securityLabel": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "N"}]}
        ],
        "content": [
            {
                "attachment": {
                    "contentType": "application/hl7-cda+xml",
                    "language": "zh-CN",
                    "url": binary_url,
                    "size": len(content),
                    "hash": base64.b64encode(hashlib.sha1(content).digest()).decode(),  # noqa: S324 - FHIR R4 SHA-1
                }
            }
        ],
        "context": {"period": {"start": "2026-11-10T08:00:00+08:00", "end": "2026-11-20T09:00:00+08:00"}},
        **document,
    }
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": {"resourceType": "List", "status": "current", "mode": "working"},
                "request": {"method": "POST", "url": "List"},
            },
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": reference,
                "request": {"method": "POST", "url": "DocumentReference"},
            },
            {
                "fullUrl": binary_url,
                "resource": {
                    "resourceType": "Binary",
                    "contentType": "application/hl7-cda+xml",
                    "data": base64.b64encode(content).decode(),
                },
                "request": {"method": "POST", "url": "Binary"},
            },
        ],
    }


@pytest.fixture
async def pair(exchange: Exchange) -> AsyncIterator[tuple[HospitalClient, HospitalClient, str]]:
    a = await exchange.member(name="省人民医院")
    b = await exchange.member(name="街道社区卫生服务中心")
    patient = person("周八")
    local = f"F-{secrets.token_hex(4)}"
    for client in (a, b):
        assert (await client.call("POST", "/api/v1/patients", json={"local_id": local, **patient})).status_code == 201
    yield a, b, local
    await a.aclose()
    await b.aclose()


async def test_provide_find_read_and_retrieve(pair) -> None:
    a, b, local = pair
    bundle = provide_bundle(local, CDA, master="urn:oid:1.2.156.1.1")
    provided = await a.call("POST", "/fhir/R4/", json=bundle)
    assert provided.status_code == 200, provided.text
    answer = provided.json()
    assert answer["resourceType"] == "Bundle"
    assert answer["type"] == "transaction-response"
    statuses = [e["response"]["status"] for e in answer["entry"]]
    assert statuses == ["201 Created", "201 Created", "201 Created"]  # the List is stored (ITI-66)
    assert answer["entry"][0]["response"]["location"].startswith("List/")
    document_id = answer["entry"][1]["response"]["location"].removeprefix("DocumentReference/")
    assert answer["entry"][2]["response"]["location"] == f"Binary/{document_id}"
    # The same submission again: the first registration.
    again = await a.call("POST", "/fhir/R4/", json=bundle)
    assert [e["response"]["status"] for e in again.json()["entry"]] == ["200 OK", "200 OK", "200 OK"]
    assert again.json()["entry"][0]["response"]["location"] == answer["entry"][0]["response"]["location"]

    found = await b.call("GET", "/fhir/R4/DocumentReference", params={"patient.identifier": local})
    assert found.status_code == 200
    assert found.headers["content-type"].startswith("application/fhir+json")
    resources = [e["resource"] for e in found.json()["entry"]]
    assert [r["id"] for r in resources] == [document_id]
    doc = resources[0]
    assert doc["status"] == "current"
    assert doc["description"] == "出院小结"
    assert doc["masterIdentifier"] == {"system": "urn:ietf:rfc:3986", "value": "urn:oid:1.2.156.1.1"}
    assert {(c["system"], c["code"]) for c in doc["type"]["coding"]} == {
        ("http://loinc.org", "18842-5"),
        ("urn:hie:shared-document-type", "discharge-summary"),
    }
    assert doc["category"][0]["coding"][0]["code"] == "summary"
    assert doc["subject"]["identifier"]["system"] == "urn:hie:enterprise-id"
    assert doc["context"]["period"]["start"].startswith("2026-11-10T00:00:00")
    attachment = doc["content"][0]["attachment"]
    assert attachment["size"] == len(CDA)
    assert attachment["extension"][0]["valueString"] == hashlib.sha256(CDA).hexdigest()

    read = await b.call("GET", f"/fhir/R4/DocumentReference/{document_id}")
    assert read.json()["id"] == document_id
    binary = await b.call("GET", "/fhir/R4" + attachment["url"].split("/fhir/R4", 1)[1])
    assert binary.status_code == 200
    assert binary.content == CDA
    as_resource = await b.call("GET", f"/fhir/R4/Binary/{document_id}", headers={"Accept": "application/fhir+json"})
    assert base64.b64decode(as_resource.json()["data"]) == CDA


async def test_search_filters_and_paging(pair) -> None:
    a, b, local = pair
    ids = []
    for day in range(1, 6):
        bundle = provide_bundle(
            local, f"第{day}份".encode(), context={"period": {"start": f"2026-10-0{day}T08:00:00Z"}}
        )
        provided = await a.call("POST", "/fhir/R4/", json=bundle)
        ids.append(provided.json()["entry"][1]["response"]["location"].removeprefix("DocumentReference/"))
    lab = provide_bundle(
        local, "血常规".encode(), type={"coding": [{"system": "urn:hie:shared-document-type", "code": "lab-report"}]}
    )
    lab_id = (await a.call("POST", "/fhir/R4/", json=lab)).json()["entry"][1]["response"]["location"].split("/")[1]

    seen: list[str] = []
    url = f"/fhir/R4/DocumentReference?patient.identifier=urn:hie:patient-id:{b.org_id}|{local}&type=http://loinc.org|18842-5&_count=2"  # type: ignore[attr-defined]
    while url:
        page = (await b.call("GET", url)).json()
        assert len(page["entry"]) <= 2
        seen += [e["resource"]["id"] for e in page["entry"]]
        following = [link["url"] for link in page["link"] if link["relation"] == "next"]
        url = following[0].split(b.base_url, 1)[1] if following else ""
    assert seen == list(reversed(ids))  # newest service time first, full pages, no repeats

    async def search(**params: str) -> list[str]:
        response = await b.call("GET", "/fhir/R4/DocumentReference", params={"patient.identifier": local, **params})
        assert response.status_code == 200, response.text
        return [e["resource"]["id"] for e in response.json().get("entry", [])]

    assert await search(type="lab-report") == [lab_id]
    assert await search(category="urn:hie:document-class|report") == [lab_id]
    window = await b.call(
        "GET",
        "/fhir/R4/DocumentReference",
        params=[("patient.identifier", local), ("date", "ge2026-10-02"), ("date", "lt2026-10-04")],
    )
    assert [e["resource"]["id"] for e in window.json()["entry"]] == [ids[2], ids[1]]
    assert await search(status="superseded") == []


async def test_errors_are_operation_outcomes(pair) -> None:
    a, b, local = pair
    unknown = await b.call("GET", "/fhir/R4/DocumentReference", params={"patient.identifier": local, "author": "x"})
    assert unknown.status_code == 400
    assert unknown.json()["resourceType"] == "OperationOutcome"
    assert unknown.json()["issue"][0]["details"]["coding"][0]["code"] == "search-param-unknown"
    missing = await b.call("GET", "/fhir/R4/DocumentReference")
    assert missing.json()["issue"][0]["details"]["coding"][0]["code"] == "patient-required"
    not_a_bundle = await a.call("POST", "/fhir/R4/", json={"resourceType": "Patient"})
    assert not_a_bundle.status_code == 400
    assert not_a_bundle.json()["resourceType"] == "OperationOutcome"
    bundle = provide_bundle(local, CDA)
    bundle["entry"][1]["resource"]["content"][0]["attachment"]["hash"] = base64.b64encode(b"0" * 20).decode()
    wrong_hash = await a.call("POST", "/fhir/R4/", json=bundle)
    assert wrong_hash.status_code == 400
    assert wrong_hash.json()["issue"][0]["details"]["coding"][0]["code"] == "hash-mismatch"
    twice = provide_bundle(local, CDA)
    twice["entry"].append(dict(twice["entry"][1]))
    duplicate = await a.call("POST", "/fhir/R4/", json=twice)
    assert duplicate.status_code == 400
    assert duplicate.json()["issue"][0]["details"]["coding"][0]["code"] == "submission-set-duplicate"
    absent = await b.call("GET", f"/fhir/R4/DocumentReference/{uuid.uuid4()}")
    assert absent.status_code == 404
    assert absent.json()["issue"][0]["code"] == "not-found"
    capability = (await b.call("GET", "/fhir/R4/metadata")).json()
    assert {"AuditEvent", "DocumentReference", "Binary"} <= {r["type"] for r in capability["rest"][0]["resource"]}


async def test_provide_a_replacement_with_relates_to(pair) -> None:
    a, b, local = pair
    first = await a.call("POST", "/fhir/R4/", json=provide_bundle(local, "第一版".encode()))
    first_id = first.json()["entry"][1]["response"]["location"].removeprefix("DocumentReference/")
    replacement = provide_bundle(
        local,
        "第二版".encode(),
        relatesTo=[{"code": "replaces", "target": {"reference": f"DocumentReference/{first_id}"}}],
    )
    second = await a.call("POST", "/fhir/R4/", json=replacement)
    assert second.status_code == 200, second.text
    second_id = second.json()["entry"][1]["response"]["location"].removeprefix("DocumentReference/")
    new = (await b.call("GET", f"/fhir/R4/DocumentReference/{second_id}")).json()
    assert new["relatesTo"] == [{"code": "replaces", "target": {"reference": f"DocumentReference/{first_id}"}}]
    old = (await b.call("GET", f"/fhir/R4/DocumentReference/{first_id}")).json()
    assert old["status"] == "superseded"
    superseded = await b.call(
        "GET", "/fhir/R4/DocumentReference", params={"patient.identifier": local, "status": "superseded"}
    )
    assert [e["resource"]["id"] for e in superseded.json().get("entry", [])] == [first_id]
    again = await a.call(
        "POST",
        "/fhir/R4/",
        json=provide_bundle(local, "第三版".encode(), relatesTo=replacement["entry"][1]["resource"]["relatesTo"]),
    )
    assert again.status_code == 422
    assert again.json()["issue"][0]["details"]["coding"][0]["code"] == "target-not-current"


def several_documents_bundle(local_ids: list[str], contents: list[bytes]) -> dict[str, Any]:
    """One provide-document bundle carrying several DocumentReferences, each with its Binary."""
    entries: list[dict[str, Any]] = []
    for local_id, content in zip(local_ids, contents, strict=True):
        entries.extend(provide_bundle(local_id, content)["entry"][1:])
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


async def test_a_bundle_of_several_documents_is_one_atomic_submission_set(pair) -> None:
    a, b, local = pair
    contents = [f"检验报告第{i}份：肝功能正常。".encode() for i in range(3)]
    bundle = several_documents_bundle([local] * 3, contents)
    provided = await a.call("POST", "/fhir/R4/", json=bundle)
    assert provided.status_code == 200, provided.text
    answers = [e["response"] for e in provided.json()["entry"]]
    assert [r["status"] for r in answers] == ["201 Created"] * 6
    references = [r["location"] for r in answers[0::2]]
    binaries = [r["location"] for r in answers[1::2]]
    assert len(set(references)) == 3
    # Each Binary is answered with its own document.
    assert [x.removeprefix("Binary/") for x in binaries] == [x.removeprefix("DocumentReference/") for x in references]

    found = await b.call("GET", "/fhir/R4/DocumentReference", params={"patient.identifier": local})
    ids = {e["resource"]["id"] for e in found.json().get("entry", [])}
    assert {x.removeprefix("DocumentReference/") for x in references} <= ids
    for location, content in zip(binaries, contents, strict=True):
        read = await b.call("GET", f"/fhir/R4/{location}")
        assert read.status_code == 200
        assert read.content == content

    again = await a.call("POST", "/fhir/R4/", json=bundle)
    assert [e["response"] for e in again.json()["entry"]] == [{**r, "status": "200 OK"} for r in answers]


async def test_a_bundle_about_two_patients_is_refused_whole(pair) -> None:
    a, b, local = pair
    other = f"F-{secrets.token_hex(4)}"
    assert (await a.call("POST", "/api/v1/patients", json={"local_id": other, **person("吴九")})).status_code == 201
    bundle = several_documents_bundle([local, other], ["第一份".encode(), "第二份".encode()])
    refused = await a.call("POST", "/fhir/R4/", json=bundle)
    assert refused.status_code == 400
    assert refused.json()["resourceType"] == "OperationOutcome"
    assert refused.json()["issue"][0]["details"]["coding"][0]["code"] == "submission-set-patient-mismatch"
    found = await b.call("GET", "/fhir/R4/DocumentReference", params={"patient.identifier": local})
    assert not found.json().get("entry")
