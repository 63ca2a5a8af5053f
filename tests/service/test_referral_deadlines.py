"""Referral deadline clocks on a real referral service with a controllable time source: a clock
survives a restart of the service, fires exactly once (also with two replicas scanning at the same
moment), pauses while on hold, follows the configured durations, and its breach is an audit event
the authority finds by organisation and a notification to both sides."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import json
from pathlib import Path

import grpc
import pytest

from gateway.client import Practitioner
from hie.common.v1 import common_pb2
from hie.referral.v1 import referral_pb2, referral_pb2_grpc
from services.referral.service import SPEC as REFERRAL
from services.shared import workflow
from services.shared.process import RunningService, start_service
from services.shared.workflow.engine import WORKFLOW_EVENT_TOPIC
from tests.conftest import Exchange, base_settings, drop_schemas
from tests.support.factories import direct_metadata, person

SCOPES = "system/ServiceRequest.crus system/DocumentReference.rs system/Patient.crs"
GP = Practitioner(id="D-GP-1", name="社区医生", role="doctor", department="全科")
SPECIALIST = Practitioner(id="D-SP-1", name="专科医生", role="doctor", department="内科")


class FakeTime:
    """The referral service's time source, moved by the test."""

    def __init__(self) -> None:
        self.now = datetime.datetime.now(datetime.UTC)

    def __call__(self) -> datetime.datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += datetime.timedelta(**delta)


def _servicer(running: RunningService):  # type: ignore[no-untyped-def]
    return workflow.attached(running.runtime)


async def _start(settings, time: FakeTime) -> RunningService:  # type: ignore[no-untyped-def]
    running = await start_service(REFERRAL, settings, listen="127.0.0.1:0")
    # The test scans itself, at the times it sets: the service's own scanner task is stopped
    # before the time source is swapped. Its first scan runs whenever the task is first
    # scheduled, which can be after the swap (then it fired the clocks the test's scans expect).
    scanners = [t for t in running.runtime._tasks if t.get_name() == "referral-deadlines"]
    assert len(scanners) == 1
    scanners[0].cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await scanners[0]
    _servicer(running).engine.now = time
    return running


async def _breach_notifications(running: RunningService) -> list[dict[str, object]]:
    table = running.runtime.outbox._table
    async with running.runtime.sessions() as session:
        rows = (await session.execute(table.select().where(table.c.topic == WORKFLOW_EVENT_TOPIC))).all()
    events = [json.loads(r.payload) for r in rows]
    return [e for e in events if e["event_type"] == "referral.deadline-breach"]


async def test_clocks_fire_once_across_a_restart_and_two_replicas(
    exchange: Exchange, tmp_path: Path, keys_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The background scan waits long: the test scans itself, at the times it sets.
    monkeypatch.setenv("HIE_REFERRAL_DEADLINE_SCAN_SECONDS", "3600")
    monkeypatch.setenv("HIE_REFERRAL_DEADLINES", json.dumps({"accept": {"urgent": 2 * 3600}}))
    a = await exchange.member(name="时钟测试社区")
    b = await exchange.member(name="时钟测试医院")
    authority = await exchange.member(type="authority", name="时钟测试卫健委")
    a_org, b_org = a.org_id, b.org_id  # type: ignore[attr-defined]
    patient = person("吴十九")
    assert (await a.call("POST", "/api/v1/patients", json={"local_id": "DL-A", **patient})).status_code == 201
    await a.aclose()
    await b.aclose()
    key = exchange.settings.gateway_signing_key_file

    def meta(org: str, who: Practitioner) -> tuple[tuple[str, str], ...]:
        return direct_metadata(key, org=org, scope=SCOPES, purpose="referral", practitioner=who)  # type: ignore[arg-type]

    settings = dataclasses.replace(
        base_settings(tmp_path, keys_dir, exchange.backend), targets=exchange.settings.targets
    )
    time = FakeTime()
    running = await _start(settings, time)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = referral_pb2_grpc.ReferralsStub(channel)

            async def create(urgency: int) -> referral_pb2.Referral:
                made = await stub.CreateReferral(
                    referral_pb2.CreateReferralRequest(
                        referral=referral_pb2.Referral(
                            patient=common_pb2.PatientRef(local_id="DL-A"),
                            target_organization_id=b_org,
                            direction=referral_pb2.REFERRAL_DIRECTION_UP,
                            urgency=urgency,  # type: ignore[arg-type]
                        )
                    ),
                    metadata=meta(a_org, GP),
                )
                return made.referral

            routine = await create(referral_pb2.REFERRAL_URGENCY_ROUTINE)
            urgent = await create(referral_pb2.REFERRAL_URGENCY_URGENT)
            emergency = await create(referral_pb2.REFERRAL_URGENCY_EMERGENCY)
            held = await create(referral_pb2.REFERRAL_URGENCY_ROUTINE)
            due = {
                r.referral_id: r.clocks[0].due.ToDatetime(tzinfo=datetime.UTC) - time.now
                for r in (routine, urgent, emergency)
            }
            # Defaults (72 h routine, 30 min emergency) and the configured 2 h for urgent.
            assert due == {
                routine.referral_id: datetime.timedelta(hours=72),
                urgent.referral_id: datetime.timedelta(hours=2),
                emergency.referral_id: datetime.timedelta(minutes=30),
            }
            time.advance(hours=1)
            await stub.MoveReferral(
                referral_pb2.MoveReferralRequest(referral_id=held.referral_id, move="hold", advice="请补充资料"),
                metadata=meta(b_org, SPECIALIST),
            )
        assert await _servicer(running).scanner.scan_once() == 1  # the emergency one
    finally:
        await running.stop(grace=None)

    # Restarted: the clocks are in the database, not in the process.
    time.advance(hours=100)
    first, second = await _start(settings, time), await _start(settings, time)
    try:
        # Two replicas scan at the same moment: each due clock fires once.
        fired = await asyncio.gather(_servicer(first).scanner.scan_once(), _servicer(second).scanner.scan_once())
        assert sum(fired) == 2, fired  # routine and urgent; the held one is paused
        assert await _servicer(first).scanner.scan_once() == 0
        async with grpc.aio.insecure_channel(f"127.0.0.1:{first.port}") as channel:
            stub = referral_pb2_grpc.ReferralsStub(channel)
            got = await stub.GetReferral(
                referral_pb2.GetReferralRequest(referral_id=routine.referral_id), metadata=meta(b_org, SPECIALIST)
            )
            assert [(c.name, c.fired) for c in got.referral.clocks] == [("accept", True)]
            assert got.referral.overdue
            listed = await stub.ListReferrals(
                referral_pb2.ListReferralsRequest(box="incoming", overdue_only=True), metadata=meta(b_org, SPECIALIST)
            )
            assert {r.referral_id for r in listed.referrals} == {
                routine.referral_id,
                urgent.referral_id,
                emergency.referral_id,
            }
            # The held referral's clock resumes with the 71 h it had left.
            supplied = await stub.MoveReferral(
                referral_pb2.MoveReferralRequest(referral_id=held.referral_id, move="supply"),
                metadata=meta(a_org, GP),
            )
            clock = supplied.referral.clocks[0]
            assert (clock.paused, clock.due.ToDatetime(tzinfo=datetime.UTC) - time.now) == (
                False,
                datetime.timedelta(hours=71),
            )
        time.advance(hours=70)
        assert await _servicer(second).scanner.scan_once() == 0
        time.advance(hours=2)
        assert await _servicer(second).scanner.scan_once() == 1
        breaches = await _breach_notifications(first)
        assert len(breaches) == 4
        assert all(sorted(b["organization_ids"]) == sorted([a_org, b_org]) for b in breaches)
        assert {b["status"] for b in breaches} == {"accept"}
        # The authority finds each breach by the organisation whose move was late.
        for replica in (first, second):
            for _ in range(20):
                if await replica.runtime.outbox.relay_once() == 0 and not await replica.runtime.outbox.pending():
                    break
        await exchange.audit_settled()
        found = await authority.call(
            "GET",
            "/api/v1/audit/events",
            params={"organization_id": b_org, "type": "referral.deadline-breach"},
            purpose="audit",
        )
        assert found.status_code == 200, found.text
        events = found.json()["events"]
        assert len(events) == 4
        assert {e["entities"][0]["id"] for e in events} == {
            routine.referral_id,
            urgent.referral_id,
            emergency.referral_id,
            held.referral_id,
        }
        assert {e["source_service"] for e in events} == {"referral"}
    finally:
        await authority.aclose()
        await first.stop(grace=None)
        await second.stop(grace=None)
        await drop_schemas(settings)
