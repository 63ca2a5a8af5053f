"""Idempotency-Key on every write route, through the gateway: a retry of the same request gets
the first response byte for byte (status and body), the same key with another request is 409
`idempotency-key-reused`, and the change (and its audit event) happened once. The OpenAPI
document is walked so that a new write route cannot forget the header."""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import secrets
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from gateway.client import DEFAULT_SCOPES, HospitalClient, Practitioner
from services.registry import dsub
from services.registry import store as registry_store
from services.shared.db import utcnow
from tests.conftest import Exchange
from tests.support.factories import person
from tests.support.webhooks import Receiver

ADMIN = Practitioner(id="A-ADM-1", name="信息科管理员", role="admin", department="信息科")
STEWARD = Practitioner(id="DS-9", name="林管理", role="data-steward", department="病案室")

# Write operations where the header makes no sense, each with the reason. Anything else that
# changes state must declare Idempotency-Key (gateway/deps.py IdempotencyKey).
EXEMPT = {
    # OAuth2 token endpoint: every call issues a new token; a retry simply gets another one.
    ("post", "/oauth2/token"),
    # Reads that take their parameters in a body (nothing is changed, a retry reads again).
    ("post", "/api/v1/consent/explain"),
    ("post", "/fhir/R4/Patient/_search"),
    ("post", "/fhir/R4/Patient/$match"),
    # (ITI-104 Remove Patient, DELETE /fhir/R4/Patient, is always 405 and not in the document.)
    # The report a consultant is to sign, rendered and returned: nothing is stored.
    ("post", "/api/v1/consultations/{consultation_id}/report-draft"),
}
# Keyed routes that do not declare the header yet (none left); listed so that the list can only
# shrink: a route named here that declares the header fails the test too.
NOT_YET_KEYED: set[tuple[str, str]] = set()


def _key() -> dict[str, str]:
    return {"Idempotency-Key": f"idem-{secrets.token_hex(8)}"}


def _same(first: httpx.Response, again: httpx.Response) -> None:
    """The retry is the first response: status and body, byte for byte."""
    assert (again.status_code, again.content) == (first.status_code, first.content)


def _reused(response: httpx.Response) -> None:
    assert response.status_code == 409, response.text
    body = response.json()
    reason = body["error"]["reason"] if "error" in body else body["issue"][0]["details"]["coding"][0]["code"]
    assert reason == "idempotency-key-reused"


async def _events(auditor: HospitalClient, organization_id: str, type_: str) -> list[dict[str, Any]]:
    response = await auditor.call(
        "GET",
        "/api/v1/audit/events",
        params={"organization_id": organization_id, "type": type_, "page_size": 500},
        purpose="audit",
    )
    assert response.status_code == 200, response.text
    return response.json()["events"]


@pytest.fixture
async def scene(exchange: Exchange) -> AsyncIterator[tuple[HospitalClient, HospitalClient, str]]:
    """A hospital with one registered patient, and the region's auditor."""
    a = await exchange.member(scopes=f"{DEFAULT_SCOPES} system/Consent.cruds", name="市第二人民医院")
    auditor = await exchange.member(type="authority", name="市卫健委")
    local = f"I-{secrets.token_hex(4)}"
    registered = await a.call("POST", "/api/v1/patients", json={"local_id": local, **person("钱九")})
    assert registered.status_code == 201, registered.text
    yield a, auditor, local
    await a.aclose()
    await auditor.aclose()


async def test_every_write_operation_declares_the_idempotency_key_header(exchange: Exchange) -> None:
    async with httpx.AsyncClient() as http:
        schema = (await http.get(f"{exchange.base_url}/openapi.json")).json()
    missing, stale = [], []
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            if method not in {"post", "put", "patch", "delete"}:
                continue
            declared = any(
                p.get("in") == "header" and p.get("name", "").lower() == "idempotency-key"
                for p in operation.get("parameters", [])
            )
            if (method, path) in EXEMPT:
                continue
            if (method, path) in NOT_YET_KEYED:
                if declared:
                    stale.append((method, path))
            elif not declared:
                missing.append((method, path))
    assert missing == [], "write routes without Idempotency-Key (gateway/deps.py IdempotencyKey)"
    assert stale == [], "keyed now: take them off NOT_YET_KEYED"
    # The exemptions name real operations (a renamed route does not silently leave the list).
    for method, path in EXEMPT | NOT_YET_KEYED:
        assert method in schema["paths"].get(path, {}), (method, path)


async def test_directive_revise_and_revoke_answer_the_first_answer(exchange: Exchange, scene) -> None:
    a, auditor, local = scene
    recorded = await a.call(
        "POST",
        "/api/v1/consent/directives",
        json={
            "patient_local_id": local,
            "policy_ids": ["urn:oid:2.16.156.10011.2.5.1"],
            "evidence_document_id": "consent-form-I-1",
            "provision": {"type": "deny", "purposes": ["research"]},
        },
    )
    assert recorded.status_code == 201, recorded.text
    directive_id = recorded.json()["directive_id"]
    path = f"/api/v1/consent/directives/{directive_id}"
    revision = {
        "policy_ids": ["urn:oid:2.16.156.10011.2.5.1"],
        "evidence_document_id": "consent-form-I-2",
        "provision": {"type": "deny"},
        "expected_revision": 1,
    }

    key = _key()
    revised = await a.call("PUT", path, json=revision, headers=key)
    assert revised.status_code == 200, revised.text
    assert revised.json()["revision"] == 2
    # The same revision again (the first answer was lost): the first answer, not a conflict on
    # the revision it made itself, and no third revision.
    _same(revised, await a.call("PUT", path, json=revision, headers=key))
    _reused(await a.call("PUT", path, json={**revision, "provision": {"type": "permit"}}, headers=key))
    assert (await a.call("GET", path)).json()["revision"] == 2

    key = _key()
    revoked = await a.call("DELETE", path, headers=key)
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["audit_event_ids"]
    _same(revoked, await a.call("DELETE", path, headers=key))  # its audit id, not `[]`
    _reused(await a.call("PUT", path, json=revision, headers=key))  # same key, another operation

    await exchange.audit_settled()
    for type_, ids in (
        ("consent.directive.revise", revised.json()["audit_event_ids"]),
        ("consent.directive.revoke", revoked.json()["audit_event_ids"]),
    ):
        events = [e for e in await _events(auditor, a.org_id, type_) if directive_id in json.dumps(e)]  # type: ignore[attr-defined]
        assert [e["event_id"] for e in events] == ids, type_


async def test_unsubscribe_and_dead_letter_replay_answer_the_first_answer(exchange: Exchange, scene) -> None:
    a, auditor, local = scene
    receiver = Receiver()
    await receiver.start()
    try:
        await _unsubscribe_and_replay(exchange, a, auditor, local, receiver)
    finally:
        await receiver.stop()


async def _unsubscribe_and_replay(
    exchange: Exchange, a: HospitalClient, auditor: HospitalClient, local: str, receiver: Receiver
) -> None:
    expires = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=30)).isoformat()
    subscription = {
        "topic": "patient-document",
        "patient_local_id": local,
        "endpoint_url": receiver.url,
        "expires": expires,
    }
    created = await a.call("POST", "/api/v1/subscriptions", json=subscription, headers=_key())
    assert created.status_code == 201, created.text
    subscription_id = created.json()["subscription_id"]

    key = _key()
    removed = await a.call("DELETE", f"/api/v1/subscriptions/{subscription_id}", headers=key)
    assert removed.status_code == 204, removed.text
    _same(removed, await a.call("DELETE", f"/api/v1/subscriptions/{subscription_id}", headers=key))
    _reused(await a.call("DELETE", f"/api/v1/subscriptions/{uuid.uuid4()}", headers=key))
    # Without a key the subscription is gone as before.
    assert (await a.call("DELETE", f"/api/v1/subscriptions/{subscription_id}")).status_code == 404

    # A dead letter as the registry's outbox leaves one (a receiver that never answered).
    now = utcnow()
    letter = dsub.notification(
        subscription_id=subscription_id,
        organization_id=a.org_id,  # type: ignore[attr-defined]
        endpoint_url=receiver.url,
        topic=dsub.TOPIC_PATIENT_DOCUMENT,
        event_type="document.registered",
        occurred=now,
        subject={},
        trace_id="",
        span_id="",
    )
    event_id = letter.event_id
    async with exchange.services["registry"].runtime.sessions() as session, session.begin():
        session.add(
            registry_store.DeadLetterRecord(
                event_id=event_id,
                subscription_id=subscription_id,
                organization_id=a.org_id,  # type: ignore[attr-defined]
                endpoint_url=letter.endpoint_url,
                event_type=letter.event_type,
                payload=letter.payload(),
                attempts=8,
                last_error="timeout",
                created=now,
                dead_lettered=now,
            )
        )
    key = _key()
    replay = f"/api/v1/notifications/dead-letters/{event_id}/replay"
    replayed = await a.call("POST", replay, headers=key, as_user=ADMIN)
    assert replayed.status_code == 200, replayed.text
    assert replayed.json()["event_id"] == event_id
    _same(replayed, await a.call("POST", replay, headers=key, as_user=ADMIN))
    _reused(
        await a.call("POST", f"/api/v1/notifications/dead-letters/{uuid.uuid4()}/replay", headers=key, as_user=ADMIN)
    )

    await exchange.audit_settled()
    org = a.org_id  # type: ignore[attr-defined]
    deletes = [e for e in await _events(auditor, org, "subscription.delete") if subscription_id in json.dumps(e)]
    assert len(deletes) == 1
    replays = [e for e in await _events(auditor, org, "notification.replay") if event_id in json.dumps(e)]
    assert len(replays) == 1
    # Delivered once, with its original event id.
    delivered = [json.loads(body)["event_id"] for _headers, body, _status in receiver.acknowledged()]
    assert delivered == [event_id]


def _bundle(local_id: str, contents: list[bytes]) -> dict[str, Any]:
    """An ITI-65 transaction Bundle of several DocumentReferences, each with its Binary."""
    entries: list[dict[str, Any]] = []
    for content in contents:
        binary_url = f"urn:uuid:{uuid.uuid4()}"
        reference = {
            "resourceType": "DocumentReference",
            "masterIdentifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:oid:1.2.156.{secrets.randbelow(10**9)}"},
            "status": "current",
            "type": {"coding": [{"system": "http://loinc.org", "code": "11502-2", "display": "检验报告"}]},
            "subject": {"identifier": {"value": local_id}},
            "date": "2026-11-20T10:00:00+08:00",
            "description": "检验报告",
            "content": [
                {
                    "attachment": {
                        "contentType": "text/plain",
                        "url": binary_url,
                        "size": len(content),
                        "hash": base64.b64encode(hashlib.sha1(content).digest()).decode(),  # noqa: S324 - FHIR R4 SHA-1
                    }
                }
            ],
        }
        entries += [
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
        ]
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


async def test_a_bundle_of_several_documents_answers_its_first_answer(exchange: Exchange, scene) -> None:
    a, auditor, local = scene
    bundle = _bundle(local, [f"检验报告第{i}份：血常规正常。".encode() for i in range(3)])
    key = _key()
    provided = await a.call("POST", "/fhir/R4/", json=bundle, headers=key)
    assert provided.status_code == 200, provided.text
    assert {e["response"]["status"] for e in provided.json()["entry"]} == {"201 Created"}
    # The retry answers as the first did (201 per document), not `200 OK` / created: false.
    _same(provided, await a.call("POST", "/fhir/R4/", json=bundle, headers=key))
    other = _bundle(local, [b"another report"])
    _reused(await a.call("POST", "/fhir/R4/", json=other, headers=key))
    _reused(await a.call("POST", "/fhir/R4/", json=_bundle(local, [b"one", b"two"]), headers=key))

    await exchange.audit_settled()
    ids = {e["response"]["location"].removeprefix("DocumentReference/") for e in provided.json()["entry"][0::2]}
    registered = [
        e
        for e in await _events(auditor, a.org_id, "document.register")  # type: ignore[attr-defined]
        if any(document_id in json.dumps(e) for document_id in ids)
    ]
    assert len(registered) == 1  # one event for the set, once


async def test_mpi_steward_operations_answer_their_first_answer(exchange: Exchange) -> None:
    a = await exchange.member(scopes="system/Patient.crus", name="市中医院")
    b = await exchange.member(scopes="system/Patient.crus", name="城北社区卫生服务中心")
    ops = await exchange.member(type="platform-admin", scopes="system/Patient.rus", name="平台运营")
    auditor = await exchange.member(type="authority", name="市卫健委")
    org = a.org_id  # type: ignore[attr-defined]
    born = f"19{secrets.randbelow(70) + 25}-{secrets.randbelow(12) + 1:02d}-{secrets.randbelow(28) + 1:02d}"
    records = {}
    for local_id in ("K-1", "K-2"):
        phone = f"138{secrets.randbelow(10**8):08d}"
        body = {"local_id": local_id, "name": "杜若", "gender": "female", "birth_date": born, "phones": [phone]}
        registered = await a.call("POST", "/api/v1/patients", json=body)
        assert registered.status_code == 201, registered.text
        records[local_id] = registered.json()

    # Merge, retried: the first answer, not "already merged".
    key = _key()
    merge = {"survivor_local_id": "K-1", "subsumed_local_id": "K-2"}
    merged = await a.call("POST", "/api/v1/patients/merge", json=merge, headers=key, as_user=ADMIN)
    assert merged.status_code == 200, merged.text
    _same(merged, await a.call("POST", "/api/v1/patients/merge", json=merge, headers=key, as_user=ADMIN))
    swapped = {"survivor_local_id": "K-2", "subsumed_local_id": "K-1"}
    _reused(await a.call("POST", "/api/v1/patients/merge", json=swapped, headers=key, as_user=ADMIN))

    key = _key()
    back = await a.call("POST", "/api/v1/patients/K-2/unmerge", headers=key, as_user=ADMIN)
    assert back.status_code == 200, back.text
    _same(back, await a.call("POST", "/api/v1/patients/K-2/unmerge", headers=key, as_user=ADMIN))
    _reused(await a.call("POST", "/api/v1/patients/K-1/unmerge", headers=key, as_user=ADMIN))

    # Unlink (the region's stewards), retried: one new enterprise id, not a second.
    key = _key()
    unlink = "/api/v1/patients/K-1/unlink"
    unlinked = await ops.call("POST", unlink, params={"domain": org}, headers=key, as_user=STEWARD)
    assert unlinked.status_code == 200, unlinked.text
    _same(unlinked, await ops.call("POST", unlink, params={"domain": org}, headers=key, as_user=STEWARD))
    # The same key from another steward is another request (the answer depends on who asks).
    other = Practitioner(id="DS-10", name="江管理", role="data-steward", department="病案室")
    _reused(await ops.call("POST", unlink, params={"domain": org}, headers=key, as_user=other))

    # A review task: claimed and decided with keys. A second record of one person at the same
    # hospital always goes to a steward, whatever weights the index has learned from the records
    # the session registered before (a pair across two hospitals may link outright instead).
    person = {"name": "柳青", "gender": "male", "birth_date": born, "phones": ["13811112222"]}
    first = await a.call("POST", "/api/v1/patients", json={"local_id": "KR-1", **person})
    assert first.status_code == 201, first.text
    second = await a.call("POST", "/api/v1/patients", json={"local_id": "KR-2", **person})
    assert second.status_code == 201, second.text
    (task_id,) = second.json()["review_task_ids"]
    task = {"id": task_id}
    assignment = f"/api/v1/mpi/review-tasks/{task['id']}/assignment"
    key = _key()
    claimed = await ops.call("POST", assignment, headers=key, as_user=STEWARD)
    assert claimed.status_code == 200, claimed.text
    _same(claimed, await ops.call("POST", assignment, headers=key, as_user=STEWARD))
    key = _key()
    decision = f"/api/v1/mpi/review-tasks/{task['id']}/decision"
    decided = await ops.call("POST", decision, json={"decision": "different"}, headers=key, as_user=STEWARD)
    assert decided.status_code == 200, decided.text
    # Without the key a second decision is refused (already decided); with it, the first answer.
    _same(decided, await ops.call("POST", decision, json={"decision": "different"}, headers=key, as_user=STEWARD))
    _reused(await ops.call("POST", decision, json={"decision": "same"}, headers=key, as_user=STEWARD))

    await exchange.audit_settled()
    for type_, organization in (
        ("patient.merge", org),
        ("patient.unmerge", org),
        ("patient.unlink", ops.org_id),  # type: ignore[attr-defined]
        ("patient.review-assign", ops.org_id),  # type: ignore[attr-defined]
        ("patient.review-decide", ops.org_id),  # type: ignore[attr-defined]
    ):
        assert len(await _events(auditor, organization, type_)) == 1, type_
    for client in (a, b, ops, auditor):
        await client.aclose()


async def test_teleconsult_directory_roster_and_slots_answer_the_first_answer(exchange: Exchange) -> None:
    c = await exchange.member(
        scopes=f"{DEFAULT_SCOPES} system/ServiceRequest.crus system/AuditEvent.rs", name="市第一人民医院"
    )
    auditor = await exchange.member(type="authority", name="市卫健委")
    specialist = {
        "name": "心内科主任",
        "department": "心内科",
        "professional_title": "主任医师",
        "years_independent_practice": 12,
        "kinds": ["ecg"],
    }
    path = "/api/v1/specialists/C-CARD-1"
    key = _key()
    set_ = await c.call("PUT", path, json=specialist, headers=key, as_user=ADMIN)
    assert set_.status_code == 200, set_.text
    _same(set_, await c.call("PUT", path, json=specialist, headers=key, as_user=ADMIN))
    _reused(await c.call("PUT", path, json={**specialist, "years_independent_practice": 3}, headers=key, as_user=ADMIN))

    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    shift = {
        "practitioner_id": "C-CARD-1",
        "kind": "ecg",
        "start": (now - datetime.timedelta(hours=1)).isoformat(),
        "end": (now + datetime.timedelta(hours=7)).isoformat(),
    }
    key = _key()
    added = await c.call("POST", "/api/v1/roster-shifts", json=shift, headers=key, as_user=ADMIN)
    assert added.status_code == 201, added.text
    # The retry gets the first shift (same shift_id), and no second shift is on call.
    _same(added, await c.call("POST", "/api/v1/roster-shifts", json=shift, headers=key, as_user=ADMIN))
    _reused(
        await c.call("POST", "/api/v1/roster-shifts", json={**shift, "kind": "imaging"}, headers=key, as_user=ADMIN)
    )
    on_call = await c.call("GET", f"/api/v1/organizations/{c.org_id}/on-call", params={"kind": "ecg"})  # type: ignore[attr-defined]
    assert [x["shift_id"] for x in on_call.json()["shifts"]] == [added.json()["shift_id"]]

    slots = {
        "slots": [
            {
                "practitioner_id": "C-CARD-1",
                "start": (now + datetime.timedelta(days=1)).isoformat(),
                "end": (now + datetime.timedelta(days=1, minutes=30)).isoformat(),
            }
        ]
    }
    key = _key()
    published = await c.call("POST", "/api/v1/consultation-slots", json=slots, headers=key, as_user=ADMIN)
    assert published.status_code == 201, published.text
    # Without the key the same slot again is a conflict; with it, the first answer.
    _same(published, await c.call("POST", "/api/v1/consultation-slots", json=slots, headers=key, as_user=ADMIN))
    other = {"slots": [{**slots["slots"][0], "practitioner_id": "C-CARD-2"}]}
    _reused(await c.call("POST", "/api/v1/consultation-slots", json=other, headers=key, as_user=ADMIN))
    listed = await c.call("GET", f"/api/v1/organizations/{c.org_id}/consultation-slots")  # type: ignore[attr-defined]
    assert [x["slot_id"] for x in listed.json()["slots"]] == [published.json()["slots"][0]["slot_id"]]

    key = _key()
    beds = await c.call("PUT", "/api/v1/referral-beds/心内科", json={"total": 8}, headers=key, as_user=ADMIN)
    assert beds.status_code == 200, beds.text
    _same(beds, await c.call("PUT", "/api/v1/referral-beds/心内科", json={"total": 8}, headers=key, as_user=ADMIN))
    _reused(await c.call("PUT", "/api/v1/referral-beds/心内科", json={"total": 9}, headers=key, as_user=ADMIN))

    await exchange.audit_settled()
    for type_ in ("consultation.specialist-set", "referral.beds.set"):
        assert len(await _events(auditor, c.org_id, type_)) == 1, type_  # type: ignore[attr-defined]
    for client in (c, auditor):
        await client.aclose()
