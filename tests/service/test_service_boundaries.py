"""Each service verifies callers itself, and a committed change's audit event survives an
audit outage and a restart of the service that recorded it."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time
from pathlib import Path

import grpc
import pytest
from sqlalchemy import func, select

from hie.audit.v1 import audit_pb2, audit_pb2_grpc
from hie.common.v1 import common_pb2
from hie.consent.v1 import consent_pb2, consent_pb2_grpc
from hie.mpi.v1 import mpi_pb2, mpi_pb2_grpc
from hie.referral.v1 import referral_pb2, referral_pb2_grpc
from hie.registry.v1 import registry_pb2, registry_pb2_grpc
from hie.teleconsult.v1 import teleconsult_pb2, teleconsult_pb2_grpc
from services.audit.service import SPEC as AUDIT
from services.mpi.service import SPEC as MPI
from services.shared.auth import PlatformCredentials
from services.shared.config import TOKEN_AUDIENCE
from services.shared.process import RunningService, start_service
from tests.conftest import Exchange, _backends, base_settings, drop_schemas
from tests.support.factories import direct_metadata

CALLS = [
    ("mpi", mpi_pb2_grpc.PatientIndexStub, "RegisterPatient", mpi_pb2.RegisterPatientRequest()),
    (
        "registry",
        registry_pb2_grpc.DocumentRegistryStub,
        "FindDocuments",
        registry_pb2.FindDocumentsRequest(),
    ),
    ("consent", consent_pb2_grpc.ConsentDecisionPointStub, "Decide", consent_pb2.DecideRequest()),
    ("referral", referral_pb2_grpc.ReferralsStub, "GetReferral", referral_pb2.GetReferralRequest()),
    (
        "teleconsult",
        teleconsult_pb2_grpc.TeleconsultationsStub,
        "GetConsultation",
        teleconsult_pb2.GetConsultationRequest(),
    ),
    ("audit", audit_pb2_grpc.AuditLogStub, "Query", audit_pb2.QueryRequest()),
]


@pytest.mark.parametrize(("service", "stub", "method", "request_message"), CALLS, ids=[c[0] for c in CALLS])
async def test_every_service_refuses_calls_without_a_valid_token(
    exchange: Exchange, service: str, stub: type, method: str, request_message: object
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{exchange.services[service].port}") as channel:
        call = getattr(stub(channel), method)
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await call(request_message)
        assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as forged:
            await call(request_message, metadata=(("authorization", "Bearer eyJhbGciOiJub25lIn0.e30."),))
        assert forged.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_health_and_reflection_answer_without_a_token(exchange: Exchange) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    for running in exchange.services.values():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _undelivered(running: RunningService, topic: str) -> int:
    table = running.runtime.outbox._table
    async with running.runtime.sessions() as session:
        count = await session.scalar(
            select(func.count()).select_from(table).where(table.c.topic == topic, table.c.delivered_at.is_(None))
        )
    return int(count or 0)


@pytest.mark.parametrize("backend", [p.values[0] for p in _backends()], ids=[p.id for p in _backends()])
async def test_audit_event_survives_audit_outage_and_service_restart(
    backend: str, tmp_path: Path, keys_dir: Path
) -> None:
    settings = base_settings(tmp_path, keys_dir, backend)
    if backend == "postgres" and not settings.database_url:
        pytest.skip("HIE_TEST_DATABASE_URL not set")
    audit_port = _free_port()
    settings = dataclasses.replace(settings, targets={**settings.targets, "audit": f"127.0.0.1:{audit_port}"})
    mpi = await start_service(MPI, settings, listen="127.0.0.1:0")
    audit = None
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{mpi.port}") as channel:
            reply = await mpi_pb2_grpc.PatientIndexStub(channel).RegisterPatient(
                mpi_pb2.RegisterPatientRequest(
                    patient=mpi_pb2.Patient(
                        ref=common_pb2.PatientRef(local_id="O-1"), name=mpi_pb2.HumanName(text="孙七")
                    )
                ),
                metadata=direct_metadata(keys_dir / "gateway.pem", org="hosp-outage"),
            )
        event_id = reply.audit_event_ids[0]
        # The registration's mpi.link.changed event has no subscriber without a broker: let it go
        # (this pass or the service's own relay delivers it).
        for _ in range(100):
            await mpi.runtime.outbox.relay_once()
            if not await _undelivered(mpi, "mpi.link.changed"):
                break
            await asyncio.sleep(0.05)
        # Audit is down: the event waits in the outbox.
        assert await mpi.runtime.outbox.relay_once() == 0
        assert await mpi.runtime.outbox.pending() == 1
        # The mpi restarts before audit is back: the event is in its database, not its memory.
        await mpi.stop(grace=None)
        mpi = await start_service(MPI, settings, listen="127.0.0.1:0")
        assert await mpi.runtime.outbox.pending() == 1
        audit = await start_service(AUDIT, settings, listen=f"127.0.0.1:{audit_port}")
        # Lease from the failed attempt and backoff: make the row due now, as time would.
        async with mpi.runtime.sessions() as session, session.begin():
            table = mpi.runtime.outbox._table
            await session.execute(table.update().values(next_attempt_at=table.c.created_at))
        assert await mpi.runtime.outbox.relay_once() == 1
        assert await mpi.runtime.outbox.pending() == 0
        credentials = PlatformCredentials.from_file(keys_dir / "platform.pem", service="test", issuer="urn:test")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{audit_port}") as channel:
            stub = audit_pb2_grpc.AuditLogStub(channel)
            found = await stub.Query(audit_pb2.QueryRequest(), metadata=credentials.metadata())
            # Delivered exactly once, even when redelivered.
            assert [e.event_id for e in found.events] == [event_id]
            assert found.events[0].type == "patient.register"
            assert found.events[0].actor.organization_id == "hosp-outage"
            await stub.Append(audit_pb2.AppendRequest(events=list(found.events)), metadata=credentials.metadata())
            again = await stub.Query(audit_pb2.QueryRequest(), metadata=credentials.metadata())
            assert len(again.events) == 1
    finally:
        await mpi.stop(grace=None)
        if audit is not None:
            await audit.stop(grace=None)
        await drop_schemas(settings)


async def test_platform_key_cannot_vouch_for_a_hospital(exchange: Exchange, keys_dir: Path) -> None:
    """A token signed with the services' platform key but claiming a hospital is refused."""
    import jwt

    from services.shared.keys import load_private_key, public_jwk

    key = load_private_key(keys_dir / "platform.pem")
    now = int(time.time())
    claims = {
        "iss": "x",
        "sub": "x",
        "aud": TOKEN_AUDIENCE,
        "iat": now,
        "exp": now + 60,
        "org": "hosp-x",
        "org_type": "hospital",
        "scope": "system/Patient.crs",
    }
    token = jwt.encode(claims, key, algorithm="ES384", headers={"kid": public_jwk(key)["kid"]})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{exchange.services['mpi'].port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await mpi_pb2_grpc.PatientIndexStub(channel).GetPatient(
                mpi_pb2.GetPatientRequest(), metadata=(("authorization", f"Bearer {token}"),)
            )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert dict(refused.value.trailing_metadata())["hie-error-reason"] == "token"


async def test_bad_user_assertion_is_refused_with_its_reason(exchange: Exchange, keys_dir: Path) -> None:
    token_only = direct_metadata(keys_dir / "gateway.pem", org="hosp-y")[:1]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{exchange.services['mpi'].port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await mpi_pb2_grpc.PatientIndexStub(channel).GetPatient(
                mpi_pb2.GetPatientRequest(), metadata=(*token_only, ("x-hie-user-assertion", "not.a.jwt"))
            )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert dict(refused.value.trailing_metadata())["hie-error-reason"] == "user-assertion"
