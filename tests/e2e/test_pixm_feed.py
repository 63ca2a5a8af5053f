"""IHE PIXm Patient Identity Feed FHIR (ITI-104) through the gateway over HTTP: a hospital adds and
revises its patients with a conditional update on its own identifier, merges a duplicate with a
replaced-by link, and is refused for another domain's identifiers, a malformed Patient and removal."""

from __future__ import annotations

import secrets
from typing import Any

import httpx

from gateway.client import HospitalClient, Practitioner
from services.shared import gb11643
from tests.conftest import Exchange
from tests.support.factories import fresh_national_id

ADMIN = Practitioner(id="AD-1", name="郑信息", role="admin", department="信息科")
FHIR_JSON = {"content-type": "application/fhir+json"}
ENTERPRISE = "urn:hie:enterprise-id"


async def _member(exchange: Exchange, name: str) -> HospitalClient:
    client = await exchange.member(name=name)
    client.scopes = "system/Patient.crus"
    return client


def _system(client: HospitalClient) -> str:
    return f"urn:hie:patient-id:{client.org_id}"  # type: ignore[attr-defined]


def _born() -> str:
    return f"19{secrets.randbelow(70) + 25}-{secrets.randbelow(12) + 1:02d}-{secrets.randbelow(28) + 1:02d}"


def _phone() -> str:
    return f"137{secrets.randbelow(10**8):08d}"


def _as_coded(nid: str) -> dict[str, str]:
    """The birth date and gender the resident id codes (so it links across hospitals)."""
    return {"birthDate": gb11643.birth_date(nid).isoformat(), "gender": gb11643.gender(nid)}


def _patient(client: HospitalClient, local_id: str, **elements: Any) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": _system(client), "value": local_id}, *elements.pop("identifier", [])],
        "active": True,
        **elements,
    }


async def _feed(client: HospitalClient, local_id: str, resource: dict[str, Any], **kwargs: Any) -> httpx.Response:
    return await client.call(
        "PUT",
        "/fhir/R4/Patient",
        params={"identifier": f"{_system(client)}|{local_id}"},
        json=resource,
        headers=FHIR_JSON,
        **kwargs,
    )


def _reason(response: httpx.Response) -> str:
    body = response.json()
    assert body["resourceType"] == "OperationOutcome", body
    return str(body["issue"][0]["details"]["coding"][0]["code"])


async def _pix(client: HospitalClient, local_id: str) -> dict[str, str]:
    response = await client.call(
        "GET", "/fhir/R4/Patient/$ihe-pix", params={"sourceIdentifier": f"{_system(client)}|{local_id}"}
    )
    assert response.status_code == 200, response.text
    return {p["valueIdentifier"]["system"]: p["valueIdentifier"]["value"] for p in response.json()["parameter"]}


async def test_add_then_revise_a_patient_by_conditional_update(exchange: Exchange) -> None:
    a = await _member(exchange, "市第八人民医院")
    born, phone, nid = _born(), _phone(), fresh_national_id()
    resource = _patient(
        a,
        "F-1",
        name=[{"use": "official", "family": "司徒", "given": ["静怡"]}],
        gender="female",
        birthDate=born,
        telecom=[{"system": "phone", "value": phone}],
        address=[{"line": ["朝阳区建国路88号"], "district": "朝阳区", "city": "北京市", "state": "北京市"}],
    )

    added = await _feed(a, "F-1", resource)
    assert added.status_code == 201, added.text
    assert added.headers["content-type"].startswith("application/fhir+json")
    patient = added.json()
    assert patient["resourceType"] == "Patient"
    assert added.headers["location"] == f"{exchange.base_url}/fhir/R4/Patient/{patient['id']}"
    assert patient["name"][0]["text"] == "司徒静怡"  # a Han name: no space between family and given
    assert (patient["name"][0]["family"], patient["name"][0]["given"]) == ("司徒", ["静怡"])
    assert patient["identifier"][0]["system"] == _system(a)
    assert patient["identifier"][0]["value"] == "F-1"
    enterprise_id = next(i["value"] for i in patient["identifier"] if i["system"] == ENTERPRISE)
    read = await a.call("GET", f"/fhir/R4/Patient/{patient['id']}")
    assert read.status_code == 200, read.text
    assert read.json() == patient  # the feed answers with the record as its read shows it

    # The same message again: an update of the same record, no second one.
    again = await _feed(a, "F-1", resource)
    assert again.status_code == 200, again.text
    assert again.json()["id"] == patient["id"]
    assert "location" in again.headers
    assert (await _pix(a, "F-1"))[ENTERPRISE] == enterprise_id
    found = await a.call("GET", "/fhir/R4/Patient", params={"family": "司徒", "given": "静怡", "birthdate": born})
    assert [e["resource"]["id"] for e in found.json()["entry"]] == [patient["id"]]

    # Revised demographics (another given name, the resident id and the birth date it codes, a new
    # address) are the record's now; Patient.id and the enterprise id round-trip.
    revised = await _feed(
        a,
        "F-1",
        {
            **resource,
            **_as_coded(nid),
            "id": patient["id"],
            "name": [{"family": "司徒", "given": ["静宜"]}],
            "identifier": [
                {"system": _system(a), "value": "F-1"},
                {"system": "urn:hie:identifier:cn-resident-id", "value": nid},
                {"system": ENTERPRISE, "value": enterprise_id},
            ],
            "address": [{"line": ["海淀区中关村大街1号"], "district": "海淀区", "city": "北京市"}],
        },
    )
    assert revised.status_code == 200, revised.text
    now = revised.json()
    assert now["id"] == patient["id"]
    assert now["name"][0]["text"] == "司徒静宜"
    assert now["address"][0]["district"] == "海淀区"
    assert now["birthDate"] == _as_coded(nid)["birthDate"]
    national = [i["value"] for i in now["identifier"] if i["system"] == "urn:hie:identifier:cn-resident-id"]
    assert national == [gb11643.mask(nid)]  # masked for a doctor, as on a read
    assert nid not in revised.text
    assert [i["value"] for i in now["identifier"] if i["system"] == ENTERPRISE] == [enterprise_id]
    history = await a.call("GET", "/api/v1/patients/F-1/link-history")
    assert [c["reason"] for c in history.json()["changes"]] == ["register"]  # still its own person
    renamed = await a.call("GET", "/fhir/R4/Patient", params={"name": "司徒静宜", "birthdate": now["birthDate"]})
    assert [e["resource"]["id"] for e in renamed.json()["entry"]] == [patient["id"]]
    # A Patient.id that is not the record's is refused.
    wrong = await _feed(a, "F-1", {**resource, "id": "00000000-0000-0000-0000-000000000000"})
    assert wrong.status_code == 400
    assert _reason(wrong) == "resource-id-mismatch"


async def test_a_merge_makes_the_retired_id_resolve_to_the_survivor(exchange: Exchange) -> None:
    a = await _member(exchange, "市第九人民医院")
    b = await _member(exchange, "城东社区卫生服务中心")
    nid = fresh_national_id()
    name = [{"text": "上官婉儿"}]
    first = await _feed(a, "S-1", _patient(a, "S-1", name=name, gender="female", birthDate=_born()))
    assert first.status_code == 201, first.text
    # The same person registered twice at hospital A (the second time with her resident id), and at
    # hospital B under that id: B's record joins the duplicate's person.
    resident_id = [{"system": "urn:hie:identifier:cn-resident-id", "value": nid}]
    second = await _feed(a, "S-2", _patient(a, "S-2", name=name, identifier=resident_id, **_as_coded(nid)))
    assert second.status_code == 201, second.text
    elsewhere = await _feed(b, "E-1", _patient(b, "E-1", name=name, identifier=resident_id, **_as_coded(nid)))
    assert elsewhere.status_code == 201, elsewhere.text
    survivor_eid = (await _pix(a, "S-1"))[ENTERPRISE]
    assert (await _pix(b, "E-1"))[ENTERPRISE] == (await _pix(a, "S-2"))[ENTERPRISE] != survivor_eid

    # Resolve Duplicate Patient: S-2, inactive, replaced by S-1.
    merge = _patient(
        a,
        "S-2",
        active=False,
        name=name,
        link=[{"other": {"identifier": {"system": _system(a), "value": "S-1"}}, "type": "replaced-by"}],
    )
    as_doctor = await _feed(a, "S-2", merge)
    assert as_doctor.status_code == 403  # merging is for the hospital's stewards and administrators
    merged = await _feed(a, "S-2", merge, as_user=ADMIN)
    assert merged.status_code == 200, merged.text
    retired = merged.json()
    assert retired["id"] == second.json()["id"]
    assert retired["active"] is False
    assert retired["link"] == [
        {
            "other": {
                "reference": f"Patient/{first.json()['id']}",
                "identifier": {"system": _system(a), "value": "S-1"},
            },
            "type": "replaced-by",
        }
    ]
    # A retried merge answers the same and changes nothing.
    retried = await _feed(a, "S-2", merge, as_user=ADMIN)
    assert retried.status_code == 200, retried.text
    assert retried.json() == retired
    history = await a.call("GET", "/api/v1/patients/S-1/link-history")
    # Hospital B's record moved to the survivor's person once (the retired S-2 is out of the person).
    assert [c["reason"] for c in history.json()["changes"] if c["local_id"] == "E-1"] == ["register", "merge"]

    # PIXm: hospital B's record now resolves to the survivor's person, with S-1 and without S-2.
    assert await _pix(b, "E-1") == {_system(a): "S-1", ENTERPRISE: survivor_eid}
    gone = await a.call("GET", "/fhir/R4/Patient/$ihe-pix", params={"sourceIdentifier": f"{_system(a)}|S-2"})
    assert gone.status_code == 404
    # A retired record is not revised by a later add / revise message.
    late = await _feed(a, "S-2", _patient(a, "S-2", name=name, gender="female"))
    assert late.status_code == 422
    assert _reason(late) == "patient-merged"
    # An unknown survivor: nothing to merge into.
    unknown = await _feed(
        a,
        "S-1",
        {
            **merge,
            "identifier": [{"system": _system(a), "value": "S-1"}],
            "link": [{"other": {"identifier": {"system": _system(a), "value": "NOPE"}}, "type": "replaced-by"}],
        },
        as_user=ADMIN,
    )
    assert unknown.status_code == 404
    assert _reason(unknown) == "patient-not-found"


async def test_another_domains_identifiers_are_refused(exchange: Exchange) -> None:
    a = await _member(exchange, "市第十人民医院")
    b = await _member(exchange, "城中社区卫生服务中心")
    resource = {**_patient(b, "X-1"), "name": [{"text": "欧阳修"}], "gender": "male"}
    # A's system in B's message, in the URL...
    foreign = await b.call(
        "PUT", "/fhir/R4/Patient", params={"identifier": f"{_system(a)}|X-1"}, json=resource, headers=FHIR_JSON
    )
    assert foreign.status_code == 403
    assert _reason(foreign) == "identifier-domain-forbidden"
    other_system = await b.call(
        "PUT", "/fhir/R4/Patient", params={"identifier": "urn:oid:1.2.3|X-1"}, json=resource, headers=FHIR_JSON
    )
    assert other_system.status_code == 403
    # ... in the body beside B's own ...
    both = await _feed(
        b, "X-1", {**resource, "identifier": [*resource["identifier"], {"system": _system(a), "value": "A-1"}]}
    )
    assert both.status_code == 403
    assert _reason(both) == "identifier-domain-forbidden"
    # ... and as a merge's survivor.
    across = await _feed(
        b,
        "X-1",
        {
            **resource,
            "active": False,
            "link": [{"other": {"identifier": {"system": _system(a), "value": "A-1"}}, "type": "replaced-by"}],
        },
        as_user=ADMIN,
    )
    assert across.status_code == 403
    # Nothing was written: B has no X-1.
    missing = await b.call("GET", "/fhir/R4/Patient/$ihe-pix", params={"sourceIdentifier": f"{_system(b)}|X-1"})
    assert missing.status_code == 404
    # A regional authority is no Patient Identity Source.
    authority = await exchange.member(type="authority", scopes="system/Patient.rs")
    refused = await authority.call(
        "PUT", "/fhir/R4/Patient", params={"identifier": f"{_system(b)}|X-1"}, json=resource, headers=FHIR_JSON
    )
    assert refused.status_code == 403


async def test_malformed_feed_messages_are_operation_outcomes_without_phi(exchange: Exchange) -> None:
    a = await _member(exchange, "市第十一人民医院")
    nid, phone = fresh_national_id(), _phone()
    good = _patient(
        a,
        "Z-1",
        name=[{"family": "诸葛", "given": ["亮"]}],
        gender="male",
        birthDate=_born(),
        telecom=[{"system": "phone", "value": phone}],
    )
    cases: list[tuple[Any, int, str]] = [
        ({**good, "resourceType": "Person"}, 400, "resource-invalid"),
        ({**good, "gender": "男"}, 400, "resource-invalid"),
        ({**good, "name": "诸葛亮"}, 400, "resource-invalid"),
        ({**good, "name": [{"family": ["诸葛"]}]}, 400, "resource-invalid"),
        ({**good, "telecom": [{"system": "phone", "value": 13800000000}]}, 400, "resource-invalid"),
        ({**good, "telecom": [{"system": "phone", "value": f"{phone}x"}]}, 400, "phone-invalid"),
        # Not a FHIR date: the R4B model refuses it, naming Patient.birthDate.
        ({**good, "birthDate": "31/12/1990"}, 400, "resource-invalid"),
        ({**good, "address": {"city": "北京市"}}, 400, "resource-invalid"),
        ({**good, "identifier": [{"system": _system(a), "value": "Z-2"}]}, 400, "identifier-mismatch"),
        (
            {
                **good,
                "identifier": [
                    *good["identifier"],
                    {
                        "system": "urn:hie:identifier:cn-resident-id",
                        "value": nid[:-1] + ("0" if nid[-1] != "0" else "1"),
                    },
                ],
            },
            400,
            "national-id-check_digit",
        ),
        ({**good, "active": False}, 422, "patient-inactive-unsupported"),
        ({**good, "link": [{"other": {"reference": "Patient/x"}, "type": "seealso"}]}, 422, "link-unsupported"),
        ({**good, "id": "not-this-record"}, 400, "resource-id-unknown"),
        ([good], 400, "resource-invalid"),
    ]
    for resource, status, reason in cases:
        response = await _feed(a, "Z-1", resource)
        assert response.status_code == status, (reason, response.text)
        assert _reason(response) == reason, response.text
        for value in (phone, nid, "诸葛", "男", "13800000000", "31/12/1990"):
            assert value not in response.text, (reason, response.text)
    not_json = await a.call(
        "PUT",
        "/fhir/R4/Patient",
        params={"identifier": f"{_system(a)}|Z-1"},
        content=f'{{"resourceType": "Patient", "name": [{{"text": "诸葛亮"}}], "telecom": "{phone}'.encode(),
        headers=FHIR_JSON,
    )
    assert not_json.status_code == 400
    assert _reason(not_json) == "resource-invalid"
    assert phone not in not_json.text
    assert "诸葛" not in not_json.text
    surrogate = await a.call(
        "PUT",
        "/fhir/R4/Patient",
        params={"identifier": f"{_system(a)}|Z-1"},
        content=b'{"resourceType": "Patient", "name": [{"text": "\\ud800"}]}',
        headers=FHIR_JSON,
    )
    assert surrogate.status_code == 400
    assert _reason(surrogate) == "resource-invalid"
    xml = await a.call(
        "PUT",
        "/fhir/R4/Patient",
        params={"identifier": f"{_system(a)}|Z-1"},
        content=b"<Patient xmlns='http://hl7.org/fhir'/>",
        headers={"content-type": "application/fhir+xml"},
    )
    assert xml.status_code == 415
    no_criteria = await a.call("PUT", "/fhir/R4/Patient", json=good, headers=FHIR_JSON)
    assert no_criteria.status_code == 400
    twice = await a.call(
        "PUT",
        "/fhir/R4/Patient",
        params=[("identifier", f"{_system(a)}|Z-1"), ("identifier", f"{_system(a)}|Z-2")],
        json=good,
        headers=FHIR_JSON,
    )
    assert twice.status_code == 400
    assert _reason(twice) == "conditional-update-invalid"
    # Nothing of the above was written.
    missing = await a.call("GET", "/fhir/R4/Patient/$ihe-pix", params={"sourceIdentifier": f"{_system(a)}|Z-1"})
    assert missing.status_code == 404
    # Remove Patient is not supported, said so.
    removed = await a.call("DELETE", "/fhir/R4/Patient", params={"identifier": f"{_system(a)}|Z-1"})
    assert removed.status_code == 405
    assert _reason(removed) == "remove-patient-unsupported"
    assert removed.json()["issue"][0]["code"] == "not-supported"
    # Without a token: 401, as every route.
    async with httpx.AsyncClient() as anonymous:
        refused = await anonymous.put(
            f"{exchange.base_url}/fhir/R4/Patient", params={"identifier": f"{_system(a)}|Z-1"}, json=good
        )
    assert refused.status_code == 401


async def test_capability_statement_declares_the_feed(exchange: Exchange) -> None:
    a = await _member(exchange, "市第十二人民医院")
    statement = (await a.call("GET", "/fhir/R4/metadata")).json()
    assert "https://profiles.ihe.net/ITI/PIXm/CapabilityStatement/IHE.PIXm.Manager" in statement["instantiates"]
    [patient] = [r for r in statement["rest"][0]["resource"] if r["type"] == "Patient"]
    assert {"code": "update"} in patient["interaction"]
    assert patient["conditionalUpdate"] is True
    assert patient["conditionalDelete"] == "not-supported"
    assert patient["updateCreate"] is False
