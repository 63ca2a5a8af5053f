"""Two-way referral (双向转诊) as a closed loop through the gateway with real HTTP: a community
centre refers a patient up to a tertiary hospital with a slot booked at creation, the hospital
accepts, the patient arrives, the outcome is registered and acknowledged; the hospital refers
the patient back down with a care plan, the community does the follow-up, and the episode closes.
Every wrong-side and wrong-state move is refused; every move is audited with its trace and
notifies the other side's webhook."""

from __future__ import annotations

import asyncio
import datetime
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import pytest
import uvicorn
from sqlalchemy import select

from gateway.client import HospitalClient, Practitioner, new_traceparent
from gateway.organizations import set_tier
from services.referral.store import TABLES
from tests.conftest import Exchange
from tests.support.factories import document, person

SCOPES = (
    "system/Patient.crs system/DocumentReference.crs system/ServiceRequest.crus system/AuditEvent.rs system/Task.crus"
)
GP = Practitioner(id="C-GP-1", name="社区全科医生", role="doctor", department="全科")
CARDIO = Practitioner(id="T-CARD-1", name="心内科医生", role="doctor", department="心内科")
NURSE = Practitioner(id="T-RN-1", name="门诊护士", role="nurse", department="心内科")


class Receiver:
    """A hospital's notification endpoint: a real HTTP server that keeps what it is sent."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.url = ""
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.received.append(
            {
                **json.loads(body),
                "_traceparent": headers.get("traceparent", ""),
                "_signature": headers.get("x-hie-signature", ""),
                "_body": body,
            }
        )
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    async def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/hie/notifications"
        self._server = uvicorn.Server(uvicorn.Config(self, log_level="warning", access_log=False, lifespan="off"))
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:  # noqa: ASYNC110 - uvicorn offers no event for it
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        assert self._server is not None
        assert self._task is not None
        self._server.should_exit = True
        await self._task

    def events(self) -> list[tuple[str, str]]:
        return [(n["event_type"], n["resource"]["status"]) for n in self.received]


@dataclass
class Alliance:
    exchange: Exchange
    community: HospitalClient
    tertiary: HospitalClient
    authority: HospitalClient
    community_org: str
    tertiary_org: str
    community_hook: Receiver
    tertiary_hook: Receiver


async def _subscribe(client: HospitalClient, url: str) -> None:
    expires = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)).isoformat()
    made = await client.call(
        "POST",
        "/api/v1/subscriptions",
        json={"topic": "workflow-state", "endpoint_url": url, "expires": expires},
        as_user=Practitioner(id="ADM-1", name="信息科", role="admin", department="信息科"),
    )
    assert made.status_code == 201, made.text


@pytest.fixture
async def alliance(exchange: Exchange) -> AsyncIterator[Alliance]:
    community = await exchange.member(scopes=SCOPES, name="城东社区卫生服务中心")
    tertiary = await exchange.member(scopes=SCOPES, name="市第一人民医院")
    authority = await exchange.member(type="authority", name="市卫生健康委员会")
    community.practitioner, tertiary.practitioner = GP, CARDIO
    c_org, t_org = community.org_id, tertiary.org_id  # type: ignore[attr-defined]
    await set_tier(exchange.settings, org_id=c_org, tier="community")
    await set_tier(exchange.settings, org_id=t_org, tier="tertiary")
    hooks = Receiver(), Receiver()
    for hook in hooks:
        await hook.start()
    await _subscribe(community, hooks[0].url)
    await _subscribe(tertiary, hooks[1].url)
    try:
        yield Alliance(exchange, community, tertiary, authority, c_org, t_org, *hooks)
    finally:
        for hook in hooks:
            await hook.stop()
        for client in (community, tertiary, authority):
            await client.aclose()


async def _move(
    client: HospitalClient, referral_id: str, move: str, *, expect: int = 200, key: str = "", **body: Any
) -> dict[str, Any]:
    traceparent = new_traceparent()
    response = await client.call(
        "POST",
        f"/api/v1/referrals/{referral_id}/{move}",
        json=body,
        purpose="referral",
        traceparent=traceparent,
        headers={"Idempotency-Key": key} if key else None,
        as_user=NURSE if move in ("arrive", "no-show") and client.practitioner is CARDIO else None,
    )
    assert response.status_code == expect, response.text
    return {**response.json(), "trace_id": traceparent.split("-")[1]}


def _refused(response: httpx.Response, status: int, reason: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["reason"] == reason, error
    return error


async def test_up_and_down_the_alliance_as_a_closed_loop(alliance: Alliance) -> None:
    s = alliance
    patient = person("钱十五")
    for client, local in ((s.community, "RL-C-1"), (s.tertiary, "RL-T-1")):
        registered = await client.call("POST", "/api/v1/patients", json={"local_id": local, **patient})
        assert registered.status_code == 201, registered.text
    ecg = await s.community.call("POST", "/api/v1/documents", json=document("RL-C-1", "心电图：ST段压低".encode()))
    assert ecg.status_code == 201, ecg.text
    ecg_id = ecg.json()["document_id"]
    start = datetime.datetime.now(datetime.UTC).replace(microsecond=0) + datetime.timedelta(days=1)
    published = {
        "slots": [
            {
                "department": "心内科",
                "start": (start + datetime.timedelta(minutes=30 * i)).isoformat(),
                "end": (start + datetime.timedelta(minutes=30 * (i + 1))).isoformat(),
            }
            for i in range(2)
        ]
    }
    slots = await s.tertiary.call(
        "POST", "/api/v1/referral-slots", json=published, headers={"Idempotency-Key": "slots-1"}
    )
    assert slots.status_code == 201, slots.text
    # A retried publication answers the first one: the same two slots, no new ones.
    again = await s.tertiary.call(
        "POST", "/api/v1/referral-slots", json=published, headers={"Idempotency-Key": "slots-1"}
    )
    assert (again.status_code, again.json()) == (201, slots.json())
    mine = await s.tertiary.call("GET", "/api/v1/referral-slots", params={"department": "心内科"})
    assert len(mine.json()["slots"]) == 2
    slot_id = slots.json()["slots"][0]["slot_id"]
    up = {
        "patient_local_id": "RL-C-1",
        "target_organization_id": s.tertiary_org,
        "reason": "反复胸痛一周，基层无法明确诊断",
        "diagnosis": {"code": "I20.0", "text": "不稳定型心绞痛"},
        "urgency": "urgent",
        "service": "outpatient",
        "target_department": "心内科",
        "clinical_summary": "高血压病史十年，规律服药",
        "contact": "全科诊室 0571-00000000",
        "document_ids": [ecg_id],
        "book_slot_id": slot_id,
    }

    # Bad input: each refused with its field named, nothing written.
    bad_code = await s.community.call(
        "POST", "/api/v1/referrals", json={**up, "diagnosis": {"code": "XYZ"}}, purpose="referral"
    )
    assert "diagnosis.code" in _refused(bad_code, 400, "referral-diagnosis")["message"]
    unknown_category = await s.community.call(
        "POST", "/api/v1/referrals", json={**up, "diagnosis": {"code": "K99.1"}}, purpose="referral"
    )
    _refused(unknown_category, 400, "referral-diagnosis")
    wrong_way = await s.community.call(
        "POST", "/api/v1/referrals", json={**up, "direction": "down"}, purpose="referral"
    )
    assert "direction" in _refused(wrong_way, 400, "referral-direction")["message"]
    to_self = await s.community.call(
        "POST", "/api/v1/referrals", json={**up, "target_organization_id": s.community_org}, purpose="referral"
    )
    _refused(to_self, 400, "self-referral")
    not_ours = await s.tertiary.call(
        "POST", "/api/v1/documents", json=document("RL-T-1", "三甲医院的检查报告".encode())
    )
    foreign_doc = await s.community.call(
        "POST",
        "/api/v1/referrals",
        json={**up, "document_ids": [not_ours.json()["document_id"], "no-such"]},
        purpose="referral",
    )
    _refused(foreign_doc, 400, "referral-documents")
    free = await s.tertiary.call("GET", "/api/v1/referral-slots", params={"free": "true"})
    assert slot_id in {x["slot_id"] for x in free.json()["slots"]}  # nothing was booked by the refusals

    created = await s.community.call("POST", "/api/v1/referrals", json=up, purpose="referral")
    assert created.status_code == 201, created.text
    r = created.json()
    referral_id = r["referral_id"]
    assert (r["state"], r["business_status"], r["direction"], r["origin_tier"], r["target_tier"]) == (
        "requested",
        "2.0",
        "up",
        "community",
        "tertiary",
    )
    assert r["referral_number"].startswith("ZZ")
    assert r["slot_id"] == slot_id
    assert [c["name"] for c in r["clocks"]] == ["accept"]
    assert r["diagnosis"] == {"code": "I20.0", "text": "不稳定型心绞痛"}

    # Free text is sealed at rest: the referral's and its history's rows hold no clear copy.
    async with s.exchange.services["referral"].runtime.sessions() as session:
        stored = [
            str(tuple(row))
            for table in (TABLES.item, TABLES.history)
            for row in (await session.execute(select(table))).all()
        ]
    assert stored
    assert not any(clear in row for row in stored for clear in ("反复胸痛", "不稳定型心绞痛", "0571-00000000"))

    # Wrong side / wrong state.
    _refused(
        await s.community.call("POST", f"/api/v1/referrals/{referral_id}/accept", purpose="referral"),
        403,
        "referral-party",
    )
    early = await s.tertiary.call("POST", f"/api/v1/referrals/{referral_id}/acknowledge", purpose="referral")
    _refused(early, 403, "referral-party")
    too_soon = await s.tertiary.call("POST", f"/api/v1/referrals/{referral_id}/arrive", purpose="referral")
    assert "requested" in _refused(too_soon, 422, "referral-state")["message"]

    # Incoming worklist of the target.
    incoming = await s.tertiary.call("GET", "/api/v1/referrals", params={"box": "incoming", "urgency": "urgent"})
    assert referral_id in {x["referral_id"] for x in incoming.json()["referrals"]}

    received = await _move(s.tertiary, referral_id, "receive")
    assert received["state"] == "received"
    accepted = await _move(s.tertiary, referral_id, "accept", reason="同意接收", key="acc-1")
    assert (accepted["state"], accepted["business_status"]) == ("accepted", "3.0")
    assert len(accepted["audit_event_ids"]) == 1
    retried = await _move(s.tertiary, referral_id, "accept", reason="同意接收", key="acc-1")
    # The first answer again, body and audit event ids (Idempotency-Key, services/shared/idempotency.py).
    assert {k: v for k, v in retried.items() if k != "trace_id"} == {
        k: v for k, v in accepted.items() if k != "trace_id"
    }
    reused = await s.tertiary.call(
        "POST",
        f"/api/v1/referrals/{referral_id}/note",
        json={"reason": "另一个请求"},
        purpose="referral",
        headers={"Idempotency-Key": "acc-1"},
    )
    _refused(reused, 409, "idempotency-key-reused")
    scheduled = await _move(s.tertiary, referral_id, "schedule", slot_id=slot_id)
    assert (scheduled["state"], scheduled["appointment_start"]) == ("scheduled", start.isoformat())
    arrived = await _move(s.tertiary, referral_id, "arrive")
    assert arrived["history"][-1]["role"] == "nurse"
    noted = await _move(s.tertiary, referral_id, "note", reason="冠脉造影已预约")
    assert (noted["state"], noted["history"][-1]["reason"]) == ("arrived", "冠脉造影已预约")
    no_outcome = await s.tertiary.call("POST", f"/api/v1/referrals/{referral_id}/complete", json={}, purpose="referral")
    _refused(no_outcome, 400, "referral-outcome-missing")
    note = await s.tertiary.call(
        "POST",
        "/api/v1/documents",
        json=document(
            "RL-T-1",
            "门诊病历：冠心病，建议药物治疗".encode(),
            type={"system": "http://loinc.org", "code": "11488-4", "display": "会诊记录"},
        ),
    )
    assert note.status_code == 201, note.text
    outcome_id = note.json()["document_id"]
    completed = await _move(s.tertiary, referral_id, "complete", outcome_document_id=outcome_id)
    assert (completed["state"], completed["business_status"], completed["outcome_document_id"]) == (
        "completed",
        "7.0",
        outcome_id,
    )
    closed = await _move(s.community, referral_id, "acknowledge", reason="已阅结果")
    assert (closed["state"], closed["business_status"]) == ("closed", "loop-closed")
    assert [h["move"] for h in closed["history"]] == [
        "receive",
        "accept",
        "schedule",
        "arrive",
        "note",
        "complete",
        "acknowledge",
    ]
    assert all(c["stopped"] and not c["fired"] for c in closed["clocks"])

    # Down: the hospital sends the patient back with a care plan for the community.
    due = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=7)
    down_body = {
        "patient_local_id": "RL-T-1",
        "target_organization_id": s.community_org,
        "parent_referral_id": referral_id,
        "reason": "病情稳定，转回社区随访",
        "diagnosis": {"code": "I25.1", "text": "冠状动脉粥样硬化性心脏病"},
        "service": "rehabilitation",
        "care_plan": {
            "follow_ups": [{"description": "两周后复查血压、心率", "due": due.isoformat()}],
            "medication": "阿司匹林 100mg qd",
            "warning_signs": "胸痛持续超过15分钟立即就医",
        },
    }
    down_created = await s.tertiary.call("POST", "/api/v1/referrals", json=down_body, purpose="referral")
    assert down_created.status_code == 201, down_created.text
    down = down_created.json()
    down_id = down["referral_id"]
    assert (down["direction"], down["episode_id"]) == ("down", closed["episode_id"])
    assert down["care_plan"]["medication"] == "阿司匹林 100mg qd"
    follow_up_id = down["care_plan"]["follow_ups"][0]["follow_up_id"]
    await _move(s.community, down_id, "accept", reason="已接收康复计划")
    assert {c["name"] for c in (await _get(s.community, down_id))["clocks"]} >= {"follow-up"}
    early_close = await s.community.call(
        "POST", f"/api/v1/referrals/{down_id}/complete", json={"outcome_document_id": ecg_id}, purpose="referral"
    )
    _refused(early_close, 422, "referral-follow-up-pending")
    wrong_side_follow_up = await s.tertiary.call(
        "POST",
        f"/api/v1/referrals/{down_id}/follow-ups/{follow_up_id}/complete",
        json={"note": "x"},
        purpose="referral",
    )
    _refused(wrong_side_follow_up, 403, "referral-party")
    done = await s.community.call(
        "POST",
        f"/api/v1/referrals/{down_id}/follow-ups/{follow_up_id}/complete",
        json={"note": "血压130/80，无胸痛"},
        purpose="referral",
        headers={"Idempotency-Key": "fu-1"},
    )
    assert done.status_code == 200, done.text
    assert len(done.json()["audit_event_ids"]) == 1
    done_again = await s.community.call(
        "POST",
        f"/api/v1/referrals/{down_id}/follow-ups/{follow_up_id}/complete",
        json={"note": "血压130/80，无胸痛"},
        purpose="referral",
        headers={"Idempotency-Key": "fu-1"},
    )
    assert (done_again.status_code, done_again.json()) == (200, done.json())
    assert done.json()["care_plan"]["follow_ups"][0]["note"] == "血压130/80，无胸痛"
    episode = await s.community.call("GET", f"/api/v1/referral-episodes/{closed['episode_id']}", purpose="referral")
    assert episode.json()["status"] == "open"
    visit = await s.community.call(
        "POST", "/api/v1/documents", json=document("RL-C-1", "社区随访记录：血压控制良好".encode())
    )
    await _move(s.community, down_id, "complete", outcome_document_id=visit.json()["document_id"])
    await _move(s.tertiary, down_id, "acknowledge")
    episode = await s.community.call("GET", f"/api/v1/referral-episodes/{closed['episode_id']}", purpose="referral")
    assert episode.status_code == 200, episode.text
    assert (episode.json()["status"], len(episode.json()["referrals"])) == ("closed", 2)

    # Every move audited, each with the trace of its request; the other side notified of each.
    await s.exchange.audit_settled()
    s.authority.practitioner = Practitioner(id="AUD-1", name="陈审计", role="auditor", department="医政医管处")
    events = await s.authority.call(
        "GET", "/api/v1/audit/events", params={"organization_id": s.tertiary_org, "page_size": 500}, purpose="audit"
    )
    assert events.status_code == 200, events.text
    reads = ("referral.list", "referral.read", "referral.slots.publish")
    mine = {
        e["event_id"]: e
        for e in events.json()["events"]
        if e["type"].startswith("referral.") and e["type"] not in reads
    }
    assert accepted["audit_event_ids"][0] in mine
    moves = [
        e["type"] for e in sorted(mine.values(), key=lambda e: e["sequence"]) if e["entities"][0]["id"] == referral_id
    ]
    assert moves == [
        "referral.receive",
        "referral.accept",
        "referral.schedule",
        "referral.arrive",
        "referral.note",
        "referral.complete",
    ]
    # One trace per move: the audit event carries the trace the hospital's request started.
    for moved in (accepted, scheduled, arrived, completed):
        assert [mine[i]["trace_id"] for i in moved["audit_event_ids"]] == [moved["trace_id"]]

    async def notified() -> bool:
        await s.exchange.audit_settled()
        return ("referral.acknowledge", "loop-closed") in s.tertiary_hook.events() and (
            "referral.accept",
            "3.0",
        ) in s.community_hook.events()

    deadline = asyncio.get_running_loop().time() + 15
    while not await notified():
        assert asyncio.get_running_loop().time() < deadline, (s.community_hook.events(), s.tertiary_hook.events())
        await asyncio.sleep(0.1)
    assert ("referral.create", "2.0") in s.tertiary_hook.events()
    # A party hears of the other side's moves, never of its own.
    about_up = [(n["event_type"]) for n in s.tertiary_hook.received if n["resource"]["id"] == referral_id]
    assert "referral.accept" not in about_up
    assert "referral.acknowledge" in about_up
    assert all(n["resource"]["type"] == "ServiceRequest" for n in s.community_hook.received)
    # The webhook continues the trace of the move that caused it.
    accept_hook = next(
        n
        for n in s.community_hook.received
        if n["event_type"] == "referral.accept" and n["resource"]["id"] == referral_id
    )
    assert accept_hook["_traceparent"].split("-")[1] == accepted["trace_id"]
    # Signed by the exchange's platform key over the exact body (detached JWS).
    trusted = json.loads(s.exchange.settings.trusted_jwks_file.read_text())
    (platform,) = [k for k in trusted["keys"] if k.get("hie_issuer") == "platform"]
    jwk = jwt.PyJWK({k: v for k, v in platform.items() if not k.startswith("hie_")})
    verified = jwt.api_jws.decode_complete(
        accept_hook["_signature"], key=jwk.key, algorithms=["ES384"], detached_payload=accept_hook["_body"]
    )
    assert verified["header"]["typ"] == "hie-notification+jws"
    # Completion makes the outcome readable by the referrer (its own patient, treatment).
    outcome_read = await s.community.call("GET", f"/api/v1/documents/{outcome_id}/content")
    assert outcome_read.status_code == 200, outcome_read.text


async def _get(client: HospitalClient, referral_id: str) -> dict[str, Any]:
    response = await client.call("GET", f"/api/v1/referrals/{referral_id}", purpose="referral")
    assert response.status_code == 200, response.text
    return response.json()
