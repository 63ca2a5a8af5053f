"""The master patient index through the gateway over HTTP: FHIR PDQm search, Patient/$match,
Patient/$ihe-pix, the stewards' review queue, link history, merge / unmerge."""

from __future__ import annotations

import secrets
from typing import Any

import httpx

from gateway.client import HospitalClient, Practitioner
from tests.conftest import Exchange

STEWARD = Practitioner(id="DS-1", name="吴管理", role="data-steward", department="病案室")
ADMIN = Practitioner(id="AD-1", name="郑信息", role="admin", department="信息科")
WRITE_SCOPES = "system/Patient.crus system/DocumentReference.crs"


async def _member(exchange: Exchange, name: str) -> HospitalClient:
    client = await exchange.member(name=name)
    client.scopes = WRITE_SCOPES
    return client


def _born() -> str:
    return f"19{secrets.randbelow(70) + 25}-{secrets.randbelow(12) + 1:02d}-{secrets.randbelow(28) + 1:02d}"


def _phone() -> str:
    return f"138{secrets.randbelow(10**8):08d}"


async def _task_of(steward: HospitalClient, domain: str, local_id: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """The open review task with this record, paging through the region's queue."""
    params = dict(kwargs.pop("params", {}))
    while True:
        listed = await steward.call(*args, params={**params, "page_size": 200}, **kwargs)
        assert listed.status_code == 200, listed.text
        for t in listed.json()["tasks"]:
            if (domain, local_id) in {(r["domain"], r["local_id"]) for r in (t["patient"], t["candidate"])}:
                return t
        token = listed.json().get("next_page_token")
        assert token, "task not found"
        params["page_token"] = token


async def test_pdqm_match_and_pix_find_one_person_in_chinese_and_pinyin(exchange: Exchange) -> None:
    a = await _member(exchange, "市第一人民医院")
    b = await _member(exchange, "城西社区卫生服务中心")
    born, phone = _born(), _phone()
    common = {"gender": "male", "birth_date": born, "phones": [phone]}
    first = await a.call("POST", "/api/v1/patients", json={"local_id": "A-1", "name": "张伟", **common})
    assert first.status_code == 201, first.text
    second = await b.call(
        "POST",
        "/api/v1/patients",
        json={"local_id": "B-1", "name": "章伟", **common, "address": {"line": "西城区西直门南大街2号"}},
    )
    assert second.json()["link_method"] == "probabilistic"
    assert second.json()["enterprise_id"] == first.json()["enterprise_id"]

    found = await a.call("GET", "/fhir/R4/Patient", params={"family": "张", "given": "伟", "birthdate": born})
    assert found.status_code == 200, found.text
    assert found.headers["content-type"].startswith("application/fhir+json")
    bundle = found.json()
    assert bundle["resourceType"] == "Bundle"
    assert bundle["type"] == "searchset"
    names = [e["resource"]["name"][0]["text"] for e in bundle["entry"]]
    assert names[0] == "张伟"
    assert "章伟" in names
    scores = [e["search"]["score"] for e in bundle["entry"]]
    assert scores == sorted(scores, reverse=True)
    assert all(0 < s <= 1 for s in scores)

    pinyin = await b.call("GET", "/fhir/R4/Patient", params={"family": "Zhang", "given": "Wei", "birthdate": born})
    assert {e["resource"]["name"][0]["text"] for e in pinyin.json()["entry"]} >= {"张伟", "章伟"}

    match = await a.call(
        "POST",
        "/fhir/R4/Patient/$match",
        json={
            "resourceType": "Parameters",
            "parameter": [
                {
                    "name": "resource",
                    "resource": {
                        "resourceType": "Patient",
                        "name": [{"family": "Zhang", "given": ["Wei"]}],
                        "gender": "male",
                        "birthDate": born,
                        "telecom": [{"system": "phone", "value": phone}],
                    },
                },
                {"name": "count", "valueInteger": 5},
            ],
        },
    )
    assert match.status_code == 200, match.text
    entries = match.json()["entry"]
    assert len(entries) >= 2
    assert entries[0]["search"]["extension"][0] == {
        "url": "http://hl7.org/fhir/StructureDefinition/match-grade",
        "valueCode": "certain",
    }
    assert entries[0]["search"]["score"] > 0.99

    pix = await b.call(
        "GET", "/fhir/R4/Patient/$ihe-pix", params={"sourceIdentifier": f"urn:hie:patient-id:{b.org_id}|B-1"}
    )
    assert pix.status_code == 200, pix.text
    targets = {(p["valueIdentifier"]["system"], p["valueIdentifier"]["value"]) for p in pix.json()["parameter"]}
    assert targets == {
        (f"urn:hie:patient-id:{a.org_id}", "A-1"),
        ("urn:hie:enterprise-id", first.json()["enterprise_id"]),
    }


async def test_fhir_patient_bad_input_is_an_operation_outcome(exchange: Exchange) -> None:
    a = await _member(exchange, "市第二人民医院")
    unknown = await a.call("GET", "/fhir/R4/Patient", params={"nickname": "伟"})
    assert unknown.status_code == 400
    assert unknown.json()["resourceType"] == "OperationOutcome"
    assert unknown.json()["issue"][0]["details"]["coding"][0]["code"] == "search-parameter-unknown"
    broad = await a.call("GET", "/fhir/R4/Patient")
    assert broad.status_code == 400
    assert broad.json()["issue"][0]["details"]["coding"][0]["code"] == "search-too-broad"
    no_resource = await a.call("POST", "/fhir/R4/Patient/$match", json={"resourceType": "Parameters"})
    assert no_resource.status_code == 400
    assert no_resource.json()["resourceType"] == "OperationOutcome"
    async with httpx.AsyncClient() as anonymous:
        refused = await anonymous.get(f"{exchange.base_url}/fhir/R4/Patient", params={"family": "张"})
    assert refused.status_code == 401


async def test_review_queue_decision_and_history_over_rest(exchange: Exchange) -> None:
    a = await _member(exchange, "市中医院")
    b = await _member(exchange, "城北社区卫生服务中心")
    # The region's data stewards are the platform operator's staff.
    ops = await exchange.member(type="platform-admin", scopes="system/Patient.rus", name="平台运营")
    born = _born()
    person = {"name": "刘芳", "gender": "female", "birth_date": born}
    await a.call("POST", "/api/v1/patients", json={"local_id": "A-2", **person, "phones": [_phone()]})
    await b.call("POST", "/api/v1/patients", json={"local_id": "B-2", **person, "phones": [_phone()]})
    as_doctor = await b.call("GET", "/api/v1/mpi/review-tasks")
    assert as_doctor.status_code == 403
    # The platform's stewards see the whole region's queue: page to this pair's task.
    task = await _task_of(ops, b.org_id, "B-2", "GET", "/api/v1/mpi/review-tasks", as_user=STEWARD)  # type: ignore[attr-defined]
    assert task["fields"]["family"]["level"] == "exact"
    assert task["fields"]["birth_date"]["level"] == "exact"
    decided = await ops.call(
        "POST", f"/api/v1/mpi/review-tasks/{task['id']}/decision", json={"decision": "same"}, as_user=STEWARD
    )
    assert decided.status_code == 200, decided.text
    assert decided.json()["status"] == "same"
    twice = await ops.call(
        "POST", f"/api/v1/mpi/review-tasks/{task['id']}/decision", json={"decision": "different"}, as_user=STEWARD
    )
    assert twice.status_code == 422
    history = await b.call("GET", "/api/v1/patients/B-2/link-history")
    assert history.status_code == 200
    assert [c["reason"] for c in history.json()["changes"] if c["local_id"] == "B-2"] == ["register", "review-same"]


async def test_merge_and_unmerge_over_rest(exchange: Exchange) -> None:
    a = await _member(exchange, "市妇幼保健院")
    born = _born()
    for local_id, phone in (("M-1", _phone()), ("M-2", _phone())):
        response = await a.call(
            "POST",
            "/api/v1/patients",
            json={"local_id": local_id, "name": "陈静", "gender": "female", "birth_date": born, "phones": [phone]},
        )
        assert response.status_code == 201
    merged = await a.call(
        "POST",
        "/api/v1/patients/merge",
        json={"survivor_local_id": "M-1", "subsumed_local_id": "M-2"},
        as_user=ADMIN,
    )
    assert merged.status_code == 200, merged.text
    gone = await a.call("GET", "/api/v1/patients/M-2/cross-references")
    assert gone.status_code == 404
    back = await a.call("POST", "/api/v1/patients/M-2/unmerge", as_user=ADMIN)
    assert back.status_code == 200, back.text
    assert back.json()["enterprise_id"] != merged.json()["enterprise_id"]


async def test_rest_search_and_pixm_target_systems(exchange: Exchange) -> None:
    from tests.support.factories import person

    a = await _member(exchange, "市肿瘤医院")
    b = await _member(exchange, "城南社区卫生服务中心")
    patient = person("欧阳娜娜")
    national_id = patient["national_id"]
    await a.call("POST", "/api/v1/patients", json={"local_id": "A-9", **patient})
    await b.call("POST", "/api/v1/patients", json={"local_id": "B-9", **patient})
    found = await b.call("GET", "/api/v1/patients/search", params={"national_id": national_id})
    assert found.status_code == 200, found.text
    assert {r["patient"]["local_id"] for r in found.json()["results"]} == {"A-9", "B-9"}
    assert found.json()["results"][0]["fields"]["national_id"]["level"] == "agree"
    assert national_id not in found.text  # masked for a doctor
    fhir = await b.call("GET", "/fhir/R4/Patient", params={"identifier": national_id})
    assert fhir.status_code == 200
    assert national_id not in fhir.text
    posted = await b.call(
        "POST",
        "/fhir/R4/Patient/_search",
        content=f"identifier={national_id}&_count=5",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert posted.status_code == 200, posted.text
    assert posted.json()["total"] == 2
    assert national_id not in posted.text
    twice = await b.call("GET", "/fhir/R4/Patient", params=[("family", "欧阳"), ("family", "李")])
    assert twice.status_code == 400
    only_a = await b.call(
        "GET",
        "/fhir/R4/Patient/$ihe-pix",
        params={
            "sourceIdentifier": f"urn:hie:patient-id:{b.org_id}|B-9",
            "targetSystem": f"urn:hie:patient-id:{a.org_id}",
        },
    )
    assert [p["valueIdentifier"]["value"] for p in only_a.json()["parameter"]] == ["A-9"]
    unknown = await b.call(
        "GET",
        "/fhir/R4/Patient/$ihe-pix",
        params={"sourceIdentifier": f"urn:hie:patient-id:{b.org_id}|B-9", "targetSystem": "urn:oid:1.2.3"},
    )
    assert unknown.status_code == 403
    assert unknown.json()["resourceType"] == "OperationOutcome"
    missing = await b.call(
        "GET", "/fhir/R4/Patient/$ihe-pix", params={"sourceIdentifier": f"urn:hie:patient-id:{b.org_id}|NOPE"}
    )
    assert missing.status_code == 404
