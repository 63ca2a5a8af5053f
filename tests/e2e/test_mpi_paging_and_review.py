"""The master patient index through the gateway over HTTP: PDQm pages with the Bundle's next link,
`_count` validation, Patient in the CapabilityStatement, the stewards' task claims over REST,
idempotent registration by the Idempotency-Key header."""

from __future__ import annotations

import datetime
import secrets
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from gateway.client import HospitalClient, Practitioner
from tests.conftest import Exchange

STEWARD = Practitioner(id="DS-1", name="吴管理", role="data-steward", department="病案室")
OTHER_STEWARD = Practitioner(id="DS-2", name="冯管理", role="data-steward", department="病案室")
WRITE_SCOPES = "system/Patient.crus"


async def _member(exchange: Exchange, name: str) -> HospitalClient:
    client = await exchange.member(name=name)
    client.scopes = WRITE_SCOPES
    return client


def _born() -> str:
    return f"19{secrets.randbelow(70) + 25}-{secrets.randbelow(12) + 1:02d}-{secrets.randbelow(28) + 1:02d}"


def _code(response: object) -> str:
    return response.json()["issue"][0]["details"]["coding"][0]["code"]  # type: ignore[attr-defined]


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


async def test_pdqm_next_links_walk_every_match_once(exchange: Exchange) -> None:
    a = await _member(exchange, "市第三人民医院")
    b = await _member(exchange, "城东社区卫生服务中心")
    born = _born()
    given = ["婉儿", "则天", "太平", "安乐", "玄宗"]
    for i, name in enumerate(given):
        client = a if i % 2 else b
        response = await client.call(
            "POST",
            "/api/v1/patients",
            json={"local_id": f"PG-{i}", "name": f"上官{name}", "gender": "female", "birth_date": born},
        )
        assert response.status_code == 201, response.text

    found = await a.call("GET", "/fhir/R4/Patient", params={"family": "上官", "birthdate": born, "_count": "2"})
    assert found.status_code == 200, found.text
    ids, counts = [], []
    bundle = found.json()
    while True:
        assert bundle["total"] == len(given)
        counts.append(len(bundle["entry"]))
        ids += [e["resource"]["id"] for e in bundle["entry"]]
        following = [link["url"] for link in bundle["link"] if link["relation"] == "next"]
        if not following:
            break
        url = urlsplit(following[0])
        params = dict(parse_qsl(url.query))
        # The link repeats no demographics: only the page size and the sealed token.
        assert set(params) == {"_count", "page"}
        assert "上官" not in following[0]
        assert born not in following[0]
        page = await a.call("GET", url.path, params=params)
        assert page.status_code == 200, page.text
        bundle = page.json()
    assert counts == [2, 2, 1]
    assert len(ids) == len(set(ids)) == len(given)

    # Another hospital cannot follow the link; a forged token is a 400 OperationOutcome.
    first = await a.call("GET", "/fhir/R4/Patient", params={"family": "上官", "birthdate": born, "_count": "2"})
    token = dict(parse_qsl(urlsplit(first.json()["link"][1]["url"]).query))["page"]
    stolen = await b.call("GET", "/fhir/R4/Patient", params={"_count": "2", "page": token})
    assert stolen.status_code == 400
    assert stolen.json()["resourceType"] == "OperationOutcome"
    assert _code(stolen) == "page-token-invalid"
    forged = await a.call("GET", "/fhir/R4/Patient", params={"page": "x" + token[1:]})
    assert forged.status_code == 400
    assert _code(forged) == "page-token-invalid"

    # The same search by POST _search pages the same way (the next link is a GET with the token).
    posted = await a.call(
        "POST",
        "/fhir/R4/Patient/_search",
        content=f"family=上官&birthdate={born}&_count=4",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert posted.status_code == 200, posted.text
    assert len(posted.json()["entry"]) == 4
    assert [link["relation"] for link in posted.json()["link"]] == ["self", "next"]

    # REST: the same paging with next_page_token.
    rest = await a.call("GET", "/api/v1/patients/search", params={"family": "上官", "birth_date": born, "limit": 3})
    assert rest.status_code == 200, rest.text
    assert rest.json()["total"] == len(given)
    rest_next = await a.call(
        "GET", "/api/v1/patients/search", params={"page_token": rest.json()["next_page_token"], "limit": 3}
    )
    assert rest_next.status_code == 200, rest_next.text
    assert rest_next.json()["next_page_token"] == ""
    rest_ids = [r["patient"]["local_id"] for r in rest.json()["results"] + rest_next.json()["results"]]
    assert sorted(rest_ids) == [f"PG-{i}" for i in range(len(given))]


async def test_pdqm_count_is_validated(exchange: Exchange) -> None:
    a = await _member(exchange, "市第四人民医院")
    for bad in ("101", "abc", "-1", "2.5", "1000000"):
        response = await a.call("GET", "/fhir/R4/Patient", params={"family": "王", "_count": bad})
        assert response.status_code == 400, (bad, response.text)
        assert response.json()["resourceType"] == "OperationOutcome"
    # _count=0 asks for the total only (FHIR search; fhirpy's count()).
    counted = await a.call("GET", "/fhir/R4/Patient", params={"family": "王", "birthdate": _born(), "_count": "0"})
    assert counted.status_code == 200, counted.text
    assert "entry" not in counted.json()


async def test_capability_statement_lists_patient(exchange: Exchange) -> None:
    a = await _member(exchange, "市第五人民医院")
    statement = (await a.call("GET", "/fhir/R4/metadata")).json()
    assert set(statement["instantiates"]) >= {
        "https://profiles.ihe.net/ITI/PDQm/CapabilityStatement/IHE.PDQm.PatientDemographicsSupplier",
        "https://profiles.ihe.net/ITI/PIXm/CapabilityStatement/IHE.PIXm.Manager",
    }
    [patient] = [r for r in statement["rest"][0]["resource"] if r["type"] == "Patient"]
    assert {p["name"] for p in patient["searchParam"]} == {
        "family",
        "given",
        "name",
        "birthdate",
        "gender",
        "identifier",
        "telecom",
        "_id",
        "_count",
        "_summary",
    }
    assert {o["name"]: o["definition"] for o in patient["operation"]} == {
        "match": "http://hl7.org/fhir/OperationDefinition/Patient-match",
        "ihe-pix": "https://profiles.ihe.net/ITI/PIXm/OperationDefinition/IHE.PIXm.pix",
    }
    assert patient["interaction"] == [{"code": "read"}, {"code": "search-type"}, {"code": "update"}]


async def test_stewards_claim_tasks_over_rest(exchange: Exchange) -> None:
    a = await _member(exchange, "市第六人民医院")
    b = await _member(exchange, "城西南社区卫生服务中心")
    # The region's data stewards are the platform operator's staff.
    ops = await exchange.member(type="platform-admin", scopes="system/Patient.rus", name="平台运营")
    born = _born()
    person = {"name": "王芳", "gender": "female", "birth_date": born}
    await a.call("POST", "/api/v1/patients", json={"local_id": "RA-1", **person, "phones": ["13811110001"]})
    await b.call("POST", "/api/v1/patients", json={"local_id": "RB-1", **person, "phones": ["13922220002"]})
    # The platform's stewards see the whole region's queue: page to this pair's task.
    task = await _task_of(
        ops, b.org_id, "RB-1", "GET", "/api/v1/mpi/review-tasks", params={"assigned": "nobody"}, as_user=STEWARD
    )  # type: ignore[attr-defined]
    assert task["assignee"] is None

    claimed = await ops.call("POST", f"/api/v1/mpi/review-tasks/{task['id']}/assignment", as_user=STEWARD)
    assert claimed.status_code == 200, claimed.text
    assert claimed.json()["assignee"]["practitioner_id"] == "DS-1"
    assert claimed.json()["assignee"]["expired"] is False
    lease = datetime.datetime.fromisoformat(claimed.json()["assignee"]["expires"]) - datetime.datetime.fromisoformat(
        claimed.json()["assignee"]["assigned"]
    )
    assert lease == datetime.timedelta(minutes=30)  # HIE_MPI_REVIEW_CLAIM_SECONDS unset
    mine = await ops.call("GET", "/api/v1/mpi/review-tasks", params={"assigned": "me"}, as_user=STEWARD)
    assert task["id"] in {t["id"] for t in mine.json()["tasks"]}
    not_theirs = await ops.call("GET", "/api/v1/mpi/review-tasks", params={"assigned": "me"}, as_user=OTHER_STEWARD)
    assert task["id"] not in {t["id"] for t in not_theirs.json()["tasks"]}
    refused = await ops.call("POST", f"/api/v1/mpi/review-tasks/{task['id']}/assignment", as_user=OTHER_STEWARD)
    assert refused.status_code == 422
    blocked = await ops.call(
        "POST", f"/api/v1/mpi/review-tasks/{task['id']}/decision", json={"decision": "same"}, as_user=OTHER_STEWARD
    )
    assert blocked.status_code == 422
    handed = await ops.call(
        "POST",
        f"/api/v1/mpi/review-tasks/{task['id']}/assignment",
        json={"assignee": "DS-2"},
        as_user=STEWARD,
    )
    assert handed.json()["assignee"]["practitioner_id"] == "DS-2"
    released = await ops.call("DELETE", f"/api/v1/mpi/review-tasks/{task['id']}/assignment", as_user=OTHER_STEWARD)
    assert released.status_code == 200, released.text
    assert released.json()["assignee"] is None
    as_doctor = await b.call("POST", f"/api/v1/mpi/review-tasks/{task['id']}/assignment")
    assert as_doctor.status_code == 403


async def test_idempotency_key_header_returns_the_first_answer(exchange: Exchange) -> None:
    a = await _member(exchange, "市第七人民医院")
    key = secrets.token_hex(8)
    body = {"local_id": "ID-1", "name": "慕容复", "gender": "male", "birth_date": _born()}
    first = await a.call("POST", "/api/v1/patients", json=body, headers={"Idempotency-Key": key})
    assert first.status_code == 201, first.text
    retry = await a.call("POST", "/api/v1/patients", json=body, headers={"Idempotency-Key": key})
    assert retry.status_code == 201
    assert retry.json()["audit_event_ids"] == first.json()["audit_event_ids"]
    reused = await a.call(
        "POST", "/api/v1/patients", json={**body, "local_id": "ID-2"}, headers={"Idempotency-Key": key}
    )
    assert reused.status_code == 409


async def test_second_record_of_a_person_at_the_same_hospital_says_it_went_to_review(exchange: Exchange) -> None:
    a = await _member(exchange, "市第七人民医院")
    person = {"name": "孙丽", "gender": "female", "birth_date": _born(), "phones": ["13811112222"]}
    first = await a.call("POST", "/api/v1/patients", json={"local_id": "S7-1", **person})
    assert first.status_code == 201, first.text
    assert first.json()["review_task_ids"] == []
    assert "review" not in first.json()
    second = await a.call("POST", "/api/v1/patients", json={"local_id": "S7-2", **person})
    assert second.status_code == 201, second.text
    body = second.json()
    assert body["link_method"] == "new"
    assert len(body["review_task_ids"]) == 1
    assert "data steward" in body["review"]
    # The region's data stewards (the platform operator's staff) find that task in their queue.
    ops = await exchange.member(type="platform-admin", scopes="system/Patient.rus", name="平台运营")
    task = await _task_of(
        ops, a.org_id, "S7-2", "GET", "/api/v1/mpi/review-tasks", params={"assigned": "nobody"}, as_user=STEWARD
    )  # type: ignore[attr-defined]
    assert task["id"] == body["review_task_ids"][0]
