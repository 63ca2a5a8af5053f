"""The audit service on a real gRPC server and database: idempotent append, tamper evidence."""

from __future__ import annotations

import uuid
from pathlib import Path

import grpc
import pytest
from sqlalchemy import text

from hie.audit.v1 import audit_pb2, audit_pb2_grpc
from hie.common.v1 import common_pb2
from services.audit import chain
from services.audit.service import SPEC as AUDIT
from services.audit.store import AuditRecord
from services.shared.auth import PlatformCredentials
from services.shared.process import RunningService
from services.shared.protection.sm2 import Sm2VerifyingKey, load_or_create_signing_key
from tests.conftest import _backends
from tests.support.services import Services


@pytest.fixture(params=_backends())
async def audit(request: pytest.FixtureRequest, services: Services) -> RunningService:
    return await services.start(AUDIT, services.settings(request.param))


def _event(n: int) -> audit_pb2.AuditEvent:
    return audit_pb2.AuditEvent(
        event_id=str(uuid.uuid4()),
        type="document.retrieve",
        action=audit_pb2.ACTION_READ,
        outcome=audit_pb2.OUTCOME_SUCCESS,
        actor=common_pb2.CallerContext(
            organization_id="hosp-b",
            organization_type="hospital",
            practitioner_name="王医生",
            purpose_of_use="treatment",
        ),
        patient_enterprise_id=str(uuid.UUID(int=n)),
        entities=[audit_pb2.EntityRef(type="DocumentReference", id=f"doc-{n}")],
        trace_id=f"{n:032x}",
        source_service="registry",
    )


async def _call(running: RunningService, method: str, request: object, keys_dir: Path) -> object:
    credentials = PlatformCredentials.from_file(keys_dir / "platform.pem", service="test", issuer="urn:test")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = audit_pb2_grpc.AuditLogStub(channel)
        return await getattr(stub, method)(request, metadata=credentials.metadata())


async def _append(running: RunningService, keys_dir: Path, events: list[audit_pb2.AuditEvent]) -> int:
    response = await _call(running, "Append", audit_pb2.AppendRequest(events=events), keys_dir)
    return response.appended  # type: ignore[attr-defined]


async def _verify(running: RunningService, keys_dir: Path) -> audit_pb2.VerifyChainResponse:
    return await _call(running, "VerifyChain", audit_pb2.VerifyChainRequest(), keys_dir)  # type: ignore[return-value]


async def test_append_is_idempotent_by_event_id(audit: RunningService, keys_dir: Path) -> None:
    events = [_event(n) for n in range(1, 6)]
    assert await _append(audit, keys_dir, events) == 5
    assert await _append(audit, keys_dir, events[2:]) == 0
    assert await _append(audit, keys_dir, [*events[:1], _event(6)]) == 1
    verdict = await _verify(audit, keys_dir)
    assert verdict.intact
    assert verdict.records_checked == 6


@pytest.mark.parametrize(
    ("statement", "broken_at"),
    [
        ("UPDATE audit_record SET organization_id = 'hosp-z' WHERE sequence = 4", 4),
        ("UPDATE audit_record SET practitioner_name = '张医生' WHERE sequence = 2", 2),
        ("UPDATE audit_record SET outcome = 3 WHERE sequence = 7", 7),
        ("DELETE FROM audit_record WHERE sequence = 5", 5),
        ("UPDATE audit_record SET hash = previous_hash WHERE sequence = 1", 1),
    ],
)
async def test_altering_any_stored_row_is_detected(
    audit: RunningService, keys_dir: Path, statement: str, broken_at: int
) -> None:
    assert await _append(audit, keys_dir, [_event(n) for n in range(1, 9)]) == 8
    assert (await _verify(audit, keys_dir)).intact
    async with audit.runtime.engine.begin() as conn:
        await conn.execute(text(statement))
    verdict = await _verify(audit, keys_dir)
    assert not verdict.intact
    assert verdict.first_break_sequence == broken_at
    assert verdict.detail


async def test_rehashing_a_tampered_row_still_breaks_the_next_link(audit: RunningService, keys_dir: Path) -> None:
    """An attacker who recomputes the altered row's own hash is caught by the following record."""
    assert await _append(audit, keys_dir, [_event(n) for n in range(1, 5)]) == 4
    async with audit.runtime.sessions() as session, session.begin():
        record = await session.get(AuditRecord, 2)
        assert record is not None
        record.organization_id = "hosp-z"
        record.hash = chain.link_hash(record.previous_hash, record.as_mapping())
    verdict = await _verify(audit, keys_dir)
    assert not verdict.intact
    assert verdict.first_break_sequence == 3


async def test_only_services_append(audit: RunningService, keys_dir: Path) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{audit.port}") as channel:
        stub = audit_pb2_grpc.AuditLogStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Append(audit_pb2.AppendRequest(events=[_event(1)]))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_records_removed_from_the_end_are_detected_by_the_signed_checkpoint(
    audit: RunningService, keys_dir: Path
) -> None:
    assert await _append(audit, keys_dir, [_event(n) for n in range(1, 9)]) == 8
    latest = await _call(audit, "LatestCheckpoint", audit_pb2.LatestCheckpointRequest(), keys_dir)
    assert latest.sequence == 8  # type: ignore[attr-defined]
    async with audit.runtime.engine.begin() as conn:
        await conn.execute(text("DELETE FROM audit_record WHERE sequence > 6"))
    verdict = await _verify(audit, keys_dir)
    assert not verdict.intact
    assert verdict.first_break_sequence == 7
    assert "removed from the end" in verdict.detail


async def test_a_checkpoint_kept_outside_detects_truncation_even_if_stored_ones_are_deleted(
    audit: RunningService, keys_dir: Path
) -> None:
    assert await _append(audit, keys_dir, [_event(n) for n in range(1, 6)]) == 5
    kept = (await _call(audit, "LatestCheckpoint", audit_pb2.LatestCheckpointRequest(), keys_dir)).jws  # type: ignore[attr-defined]
    async with audit.runtime.engine.begin() as conn:
        await conn.execute(text("DELETE FROM audit_record WHERE sequence = 5"))
        await conn.execute(text("DELETE FROM audit_checkpoint"))
    assert (await _verify(audit, keys_dir)).intact  # nothing inside the database shows it...
    verdict = await _call(audit, "VerifyChain", audit_pb2.VerifyChainRequest(expected_checkpoint=kept), keys_dir)
    assert not verdict.intact  # type: ignore[attr-defined]
    assert verdict.first_break_sequence == 5  # type: ignore[attr-defined]


async def test_altered_or_forged_checkpoints_are_refused(audit: RunningService, keys_dir: Path) -> None:
    import jwt

    from services.shared.keys import generate_ec_key, public_jwk

    assert await _append(audit, keys_dir, [_event(n) for n in range(1, 4)]) == 3
    await _call(audit, "LatestCheckpoint", audit_pb2.LatestCheckpointRequest(), keys_dir)
    async with audit.runtime.engine.begin() as conn:
        await conn.execute(text("UPDATE audit_checkpoint SET hash = :h"), {"h": "f" * 64})
    verdict = await _verify(audit, keys_dir)
    assert not verdict.intact
    assert verdict.detail == "a stored checkpoint was altered"
    stranger = generate_ec_key()
    forged = jwt.encode(
        {"sequence": 3, "hash": "0" * 64}, stranger, algorithm="ES384", headers={"kid": public_jwk(stranger)["kid"]}
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _call(audit, "VerifyChain", audit_pb2.VerifyChainRequest(expected_checkpoint=forged), keys_dir)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_checkpoints_are_signed_as_records_accumulate(
    audit: RunningService, keys_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.audit import servicer

    monkeypatch.setattr(servicer, "CHECKPOINT_EVERY", 3)
    for n in range(1, 8):
        await _append(audit, keys_dir, [_event(n)])
    async with audit.runtime.engine.begin() as conn:
        signed = [row[0] for row in await conn.execute(text("SELECT sequence FROM audit_checkpoint ORDER BY id"))]
    assert signed == [3, 6]
    assert (await _verify(audit, keys_dir)).intact


async def test_a_time_range_is_verified_on_its_own(audit: RunningService, keys_dir: Path) -> None:
    import datetime

    from google.protobuf.timestamp_pb2 import Timestamp

    def at(day: int) -> Timestamp:
        ts = Timestamp()
        ts.FromDatetime(datetime.datetime(2026, 11, day, 8, 0, tzinfo=datetime.UTC))
        return ts

    events = []
    for n in range(1, 11):
        event = _event(n)
        event.occurred.CopyFrom(at(n))
        events.append(event)
    assert await _append(audit, keys_dir, events) == 10
    window = audit_pb2.VerifyChainRequest(since=at(4), until=at(8))
    verdict = await _call(audit, "VerifyChain", window, keys_dir)
    assert verdict.intact  # type: ignore[attr-defined]
    assert verdict.records_checked == 4  # type: ignore[attr-defined]  # days 4, 5, 6, 7
    async with audit.runtime.engine.begin() as conn:
        await conn.execute(text("UPDATE audit_record SET type = 'x' WHERE sequence = 9"))
    assert (await _call(audit, "VerifyChain", window, keys_dir)).intact  # type: ignore[attr-defined]
    assert not (await _verify(audit, keys_dir)).intact
    async with audit.runtime.engine.begin() as conn:
        await conn.execute(text("UPDATE audit_record SET type = 'x' WHERE sequence = 5"))
    broken = await _call(audit, "VerifyChain", window, keys_dir)
    assert not broken.intact  # type: ignore[attr-defined]
    assert broken.first_break_sequence == 5  # type: ignore[attr-defined]


@pytest.fixture(params=_backends())
async def sm_audit(request: pytest.FixtureRequest, services: Services) -> RunningService:
    """The audit service under the national-algorithms option (HIE_CRYPTO_SUITE=sm)."""
    return await services.start(AUDIT, services.settings(request.param, crypto_suite="sm"))


async def test_checkpoints_are_co_signed_with_sm2_under_the_national_algorithms(
    sm_audit: RunningService, keys_dir: Path
) -> None:
    assert await _append(sm_audit, keys_dir, [_event(n) for n in range(1, 4)]) == 3
    latest = await _call(sm_audit, "LatestCheckpoint", audit_pb2.LatestCheckpointRequest(), keys_dir)
    public = Sm2VerifyingKey(bytes.fromhex(latest.sm2_public_key))  # type: ignore[attr-defined]
    assert public.verify(latest.jws.encode(), bytes.fromhex(latest.sm2_signature))  # type: ignore[attr-defined]
    assert public.point == load_or_create_signing_key(sm_audit.runtime.settings.sm2_signing_key_file).public.point
    assert (await _verify(sm_audit, keys_dir)).intact

    # A checkpoint whose SM2 co-signature is altered, or stripped (a downgrade), breaks verification.
    assert await _append(sm_audit, keys_dir, [_event(n) for n in range(4, 6)]) == 2
    await _call(sm_audit, "LatestCheckpoint", audit_pb2.LatestCheckpointRequest(), keys_dir)
    for tampering, value in [
        ("UPDATE audit_checkpoint SET sm2_signature = :v WHERE sequence = 5", "00" * 72),
        ("UPDATE audit_checkpoint SET sm2_signature = :v WHERE sequence = 5", None),
    ]:
        async with sm_audit.runtime.engine.begin() as conn:
            await conn.execute(text(tampering), {"v": value})
        verdict = await _verify(sm_audit, keys_dir)
        assert not verdict.intact
        assert verdict.first_break_sequence == 5
        assert "SM2" in verdict.detail
