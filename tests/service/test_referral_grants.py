"""Referral transitions over real gRPC: who may move a referral where, the state history, and
the consent grant that follows it through the referral outbox, surviving a consent outage and
a restart of the referral service."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from pathlib import Path

import grpc
import pytest

from gateway.client import Practitioner
from hie.common.v1 import common_pb2
from hie.consent.v1 import consent_pb2, consent_pb2_grpc
from hie.referral.v1 import referral_pb2, referral_pb2_grpc
from services.referral.service import SPEC as REFERRAL
from services.shared.consent_grants import GRANT_TOPIC
from services.shared.process import RunningService, start_service
from tests.conftest import Exchange, base_settings, drop_schemas
from tests.support.factories import direct_metadata, document, person

SCOPES = "system/ServiceRequest.crus system/DocumentReference.rs system/Patient.crs"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _reason(exc: pytest.ExceptionInfo[grpc.aio.AioRpcError]) -> str:
    return str(dict(exc.value.trailing_metadata() or ())["hie-error-reason"])


async def _make_due(running: RunningService) -> None:
    # Lease and backoff of the failed attempts: make the rows due now, as time would.
    async with running.runtime.sessions() as session, session.begin():
        table = running.runtime.outbox._table
        await session.execute(table.update().values(next_attempt_at=table.c.created_at))


async def _grant_topic_pending(running: RunningService) -> int:
    table = running.runtime.outbox._table
    async with running.runtime.sessions() as session:
        rows = (
            await session.execute(table.select().where(table.c.topic == GRANT_TOPIC, table.c.delivered_at.is_(None)))
        ).all()
    return len(rows)


async def test_grant_follows_the_referral_through_an_outage_and_a_restart(
    exchange: Exchange, tmp_path: Path, keys_dir: Path
) -> None:
    a = await exchange.member(name="转诊测试社区中心")
    b = await exchange.member(name="转诊测试三甲医院")
    a_org, b_org = a.org_id, b.org_id  # type: ignore[attr-defined]
    patient = person("孙十三")
    at_a = await a.call("POST", "/api/v1/patients", json={"local_id": "RG-A", **patient})
    await b.call("POST", "/api/v1/patients", json={"local_id": "RG-B", **patient})
    enterprise_id = at_a.json()["enterprise_id"]
    # A referral attaches the requester's own documents about the patient.
    attached = await a.call("POST", "/api/v1/documents", json=document("RG-A", "转诊摘要".encode()))
    assert attached.status_code == 201, attached.text
    attached_id = attached.json()["document_id"]
    await a.aclose()
    await b.aclose()
    key = exchange.settings.gateway_signing_key_file
    doctor_a = Practitioner(id="A-GP-1", name="社区全科医生", role="doctor", department="全科")
    doctor_b = Practitioner(id="B-CARD-1", name="心内科医生", role="doctor", department="心内科")

    def meta(org: str, who: Practitioner, purpose: str = "referral") -> tuple[tuple[str, str], ...]:
        return direct_metadata(key, org=org, scope=SCOPES, purpose=purpose, practitioner=who)  # type: ignore[arg-type]

    # A referral service of its own, whose consent peer is down.
    settings = base_settings(tmp_path, keys_dir, exchange.backend)
    live_targets = {**exchange.settings.targets}
    settings = dataclasses.replace(settings, targets={**live_targets, "consent": f"127.0.0.1:{_free_port()}"})
    referral = await start_service(REFERRAL, settings, listen="127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{referral.port}") as channel:
            stub = referral_pb2_grpc.ReferralsStub(channel)
            created = await stub.CreateReferral(
                referral_pb2.CreateReferralRequest(
                    referral=referral_pb2.Referral(
                        patient=common_pb2.PatientRef(local_id="RG-A"),
                        target_organization_id=b_org,
                        direction=referral_pb2.REFERRAL_DIRECTION_UP,
                        reason="胸痛待查，建议上级医院进一步诊治",
                        document_ids=[attached_id],
                    )
                ),
                metadata=meta(a_org, doctor_a),
            )
            referral_id = created.referral.referral_id
            # Only the receiving organisation accepts.
            with pytest.raises(grpc.aio.AioRpcError) as wrong_party:
                await stub.AcceptReferral(
                    referral_pb2.AcceptReferralRequest(referral_id=referral_id), metadata=meta(a_org, doctor_a)
                )
            assert _reason(wrong_party) == "referral-party"
            with pytest.raises(grpc.aio.AioRpcError) as not_yet:
                await stub.CompleteReferral(
                    referral_pb2.CompleteReferralRequest(referral_id=referral_id), metadata=meta(b_org, doctor_b)
                )
            assert _reason(not_yet) == "referral-state"
            with pytest.raises(grpc.aio.AioRpcError) as stranger:
                await stub.AcceptReferral(
                    referral_pb2.AcceptReferralRequest(referral_id=referral_id), metadata=meta("hosp-other", doctor_b)
                )
            assert stranger.value.code() == grpc.StatusCode.NOT_FOUND
            accepted = await stub.AcceptReferral(
                referral_pb2.AcceptReferralRequest(referral_id=referral_id, reason="同意接收"),
                metadata=meta(b_org, doctor_b),
            )
            assert accepted.referral.state == referral_pb2.REFERRAL_STATE_ACCEPTED
            assert [(h.from_state, h.to_state, h.organization_id) for h in accepted.referral.history] == [
                (referral_pb2.REFERRAL_STATE_REQUESTED, referral_pb2.REFERRAL_STATE_ACCEPTED, b_org)
            ]
            assert len(accepted.audit_event_ids) == 1
            # A retried accept changes nothing and records nothing.
            again = await stub.AcceptReferral(
                referral_pb2.AcceptReferralRequest(referral_id=referral_id), metadata=meta(b_org, doctor_b)
            )
            assert (len(again.referral.history), list(again.audit_event_ids)) == (1, [])
        # Consent is down: the grant waits in the referral service's own database.
        await referral.runtime.outbox.relay_once()
        assert await _grant_topic_pending(referral) == 1
    finally:
        await referral.stop(grace=None)

    # The referral service restarts with consent reachable: the grant is delivered.
    referral = await start_service(REFERRAL, dataclasses.replace(settings, targets=live_targets), listen="127.0.0.1:0")
    try:
        assert await _grant_topic_pending(referral) == 1
        # At least once: a transient failure (a peer's connection recycled) is retried, as the
        # relay would after its backoff.
        for _attempt in range(10):
            await _make_due(referral)
            await referral.runtime.outbox.relay_once()
            if await _grant_topic_pending(referral) == 0:
                break
            await asyncio.sleep(0.1)
        assert await _grant_topic_pending(referral) == 0
        async with grpc.aio.insecure_channel(f"127.0.0.1:{exchange.services['consent'].port}") as channel:
            consent = consent_pb2_grpc.ConsentDecisionPointStub(channel)

            async def decide() -> consent_pb2.ItemDecision:
                reply = await consent.Decide(
                    consent_pb2.DecideRequest(
                        enterprise_id=enterprise_id,
                        items=[consent_pb2.DecisionItem(item_id=attached_id, source_organization_id=a_org)],
                        requester_holds_record=True,
                    ),
                    metadata=meta(b_org, doctor_b),
                )
                return reply.decisions[0]

            granted = await decide()
            assert (granted.decision, granted.basis) == (consent_pb2.DECISION_PERMIT, "grant")
            async with grpc.aio.insecure_channel(f"127.0.0.1:{referral.port}") as channel_r:
                stub = referral_pb2_grpc.ReferralsStub(channel_r)
                with pytest.raises(grpc.aio.AioRpcError) as target_cancels:
                    await stub.CancelReferral(
                        referral_pb2.CancelReferralRequest(referral_id=referral_id), metadata=meta(b_org, doctor_b)
                    )
                assert _reason(target_cancels) == "referral-party"
                cancelled = await stub.CancelReferral(
                    referral_pb2.CancelReferralRequest(referral_id=referral_id, reason="患者改变就诊计划"),
                    metadata=meta(a_org, doctor_a),
                )
                assert cancelled.referral.state == referral_pb2.REFERRAL_STATE_CANCELLED
                got = await stub.GetReferral(
                    referral_pb2.GetReferralRequest(referral_id=referral_id), metadata=meta(b_org, doctor_b)
                )
                assert [h.to_state for h in got.referral.history] == [
                    referral_pb2.REFERRAL_STATE_ACCEPTED,
                    referral_pb2.REFERRAL_STATE_CANCELLED,
                ]
                assert got.referral.history[1].reason == "患者改变就诊计划"
            await referral.runtime.outbox.relay_once()
            revoked = await decide()
            assert (revoked.decision, revoked.basis) == (
                consent_pb2.DECISION_DENY,
                "regional-default:purpose-not-permitted",
            )
    finally:
        await referral.stop(grace=None)
        await drop_schemas(settings)
