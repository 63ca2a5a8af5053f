"""The registry caches the mpi's cross-references for document queries and reads: a change to
who is whom is seen by the very next query through the gateway (the mpi has the registry drop
its cache before the change's answer is returned), and consent still decides every read."""

from __future__ import annotations

import secrets

from gateway.client import Practitioner
from tests.conftest import Exchange
from tests.support.factories import document, person

STEWARD = Practitioner(id="DS-31", name="包管理", role="data-steward", department="病案室")
SCOPES = "system/Patient.crus system/DocumentReference.crs"


async def test_an_unlink_and_a_link_are_seen_by_the_very_next_query(exchange: Exchange) -> None:
    a = await exchange.member(scopes=SCOPES, name="市第三人民医院")
    b = await exchange.member(scopes=SCOPES, name="城西社区卫生服务中心")
    ops = await exchange.member(type="platform-admin", scopes="system/Patient.rus", name="平台运营")
    tag = secrets.token_hex(3)
    same = person("司马燕")
    at_a = await a.call("POST", "/api/v1/patients", json={"local_id": f"XA-{tag}", **same})
    at_b = await b.call("POST", "/api/v1/patients", json={"local_id": f"XB-{tag}", **same})
    assert at_a.status_code == at_b.status_code == 201
    assert at_b.json()["enterprise_id"] == at_a.json()["enterprise_id"]
    note = await a.call("POST", "/api/v1/documents", json=document(f"XA-{tag}", "出院小结：肺炎".encode()))
    assert note.status_code == 201, note.text
    note_id = note.json()["document_id"]

    async def b_sees() -> tuple[bool, int]:
        found = await b.call("GET", "/api/v1/documents", params={"patient_local_id": f"XB-{tag}"})
        assert found.status_code == 200, found.text
        read = await b.call("GET", f"/api/v1/documents/{note_id}")
        return note_id in {e["document_id"] for e in found.json()["entries"]}, read.status_code

    # Asked twice: the second answer comes from the registry's cache.
    assert await b_sees() == (True, 200)
    assert await b_sees() == (True, 200)
    unlinked = await ops.call("POST", f"/api/v1/patients/XB-{tag}/unlink", params={"domain": b.org_id}, as_user=STEWARD)
    assert unlinked.status_code == 200, unlinked.text
    seen, read_status = await b_sees()
    assert not seen
    assert read_status in (403, 404)
    linked = await ops.call(
        "POST",
        f"/api/v1/patients/XB-{tag}/link",
        params={"domain": b.org_id},
        json={"target": {"domain": a.org_id, "local_id": f"XA-{tag}"}},
        as_user=STEWARD,
    )
    assert linked.status_code == 200, linked.text
    assert await b_sees() == (True, 200)
    for client in (a, b, ops):
        await client.aclose()


async def test_a_registration_that_links_is_seen_by_the_very_next_query(exchange: Exchange) -> None:
    a = await exchange.member(scopes=SCOPES, name="市第四人民医院")
    b = await exchange.member(scopes=SCOPES, name="城东社区卫生服务中心")
    tag = secrets.token_hex(3)
    same = person("上官琳")
    at_b = await b.call("POST", "/api/v1/patients", json={"local_id": f"RB-{tag}", **same})
    assert at_b.status_code == 201, at_b.text

    async def b_finds() -> set[str]:
        found = await b.call("GET", "/api/v1/documents", params={"patient_local_id": f"RB-{tag}"})
        assert found.status_code == 200, found.text
        return {e["document_id"] for e in found.json()["entries"]}

    assert await b_finds() == set()  # B's own record only, now cached
    at_a = await a.call("POST", "/api/v1/patients", json={"local_id": f"RA-{tag}", **same})
    assert at_a.status_code == 201, at_a.text
    assert at_a.json()["enterprise_id"] == at_b.json()["enterprise_id"]
    note = await a.call("POST", "/api/v1/documents", json=document(f"RA-{tag}", "门诊病历：糖尿病".encode()))
    assert note.status_code == 201, note.text
    assert await b_finds() == {note.json()["document_id"]}
    for client in (a, b):
        await client.aclose()


async def test_a_cached_person_is_still_consent_checked_and_audited_on_every_read(exchange: Exchange) -> None:
    a = await exchange.member(scopes=SCOPES, name="市第五人民医院")
    b = await exchange.member(scopes=SCOPES, name="城中社区卫生服务中心")
    auditor = await exchange.member(type="authority", name="市卫健委")
    tag = secrets.token_hex(3)
    same = person("欧阳雪")
    for client, local_id in ((a, f"CA-{tag}"), (b, f"CB-{tag}")):
        registered = await client.call("POST", "/api/v1/patients", json={"local_id": local_id, **same})
        assert registered.status_code == 201, registered.text
    note = await a.call("POST", "/api/v1/documents", json=document(f"CA-{tag}", "检验报告：血常规".encode()))
    assert note.status_code == 201, note.text
    note_id = note.json()["document_id"]
    for _ in range(3):
        read = await b.call("GET", f"/api/v1/documents/{note_id}")
        assert read.status_code == 200, read.text
    await exchange.audit_settled()
    events = await auditor.call(
        "GET",
        "/api/v1/audit/events",
        params={"organization_id": b.org_id, "type": "document.read", "page_size": 500},
        purpose="audit",
    )
    assert events.status_code == 200, events.text
    assert sum(note_id in str(e) for e in events.json()["events"]) == 3
    for client in (a, b, auditor):
        await client.aclose()
