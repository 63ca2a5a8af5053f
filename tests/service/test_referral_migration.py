"""Migration 0005 of the referral service: referrals stored before free text was sealed keep their
reason and history, sealed in place (no clear copy left), readable through the service. Real
database (SQLite and PostgreSQL), real migrations, real referral service."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command

from services.referral.service import SPEC as REFERRAL
from services.referral.store import ReferralRecord, history_context, sealed_context
from services.shared import workflow
from services.shared.db import engine_for, ensure_schema
from services.shared.migrations import alembic_config
from services.shared.process import start_service
from tests.conftest import _backends, base_settings, drop_schemas

_REASON = "胸闷气短两周，心电图提示ST段改变"
_ACCEPTED = "同意接收，请患者周三上午就诊"


@pytest.mark.parametrize("backend", _backends())
async def test_existing_referrals_are_sealed_in_place(backend: str, tmp_path: Path, keys_dir: Path) -> None:
    settings = base_settings(tmp_path, keys_dir, backend)
    engine = engine_for(settings, "referral")
    try:
        await ensure_schema(engine, settings.schema_for("referral"))
        async with engine.begin() as conn:
            await conn.run_sync(
                lambda sync: command.upgrade(alembic_config(REFERRAL.versions, REFERRAL.metadata, sync), "0004")
            )
            now = datetime.datetime.now(datetime.UTC)
            await conn.execute(
                sa.text(
                    "INSERT INTO referral (id, patient_domain, patient_local_id, requester_organization_id, "
                    "target_organization_id, direction, reason, state, version, document_ids, idempotency_key, "
                    "created_at) VALUES ('r-1', 'org-a', 'L-1', 'org-a', 'org-b', 1, :reason, 2, 1, '[]', 'k-1', :now)"
                ),
                {"reason": _REASON, "now": now},
            )
            await conn.execute(
                sa.text(
                    "INSERT INTO referral_state_change (id, referral_id, from_state, to_state, move, organization_id, "
                    "practitioner_id, role, reason, request_key, changed_at) "
                    "VALUES ('h-1', 'r-1', 1, 2, 'accept', 'org-b', 'D-1', 'doctor', :reason, '', :now)"
                ),
                {"reason": _ACCEPTED, "now": now},
            )
    finally:
        await engine.dispose()

    running = await start_service(REFERRAL, settings, listen="127.0.0.1:0")
    try:
        async with running.runtime.engine.connect() as conn:
            row = (await conn.execute(sa.text("SELECT reason, sealed FROM referral WHERE id = 'r-1'"))).one()
            history = await conn.scalar(sa.text("SELECT reason FROM referral_state_change WHERE id = 'h-1'"))
        assert row.reason == ""
        assert _REASON not in row.sealed
        assert _ACCEPTED not in history
        fields = running.runtime.protection.fields  # type: ignore[union-attr]
        assert _REASON in fields.decrypt(row.sealed, context=sealed_context("r-1"))
        assert fields.decrypt(history, context=history_context("h-1")) == _ACCEPTED
        servicer = workflow.attached(running.runtime)
        async with running.runtime.sessions() as session:
            record = await session.get(ReferralRecord, "r-1")
            assert record is not None
            assert servicer._open(record)["reason"] == _REASON
    finally:
        await running.stop(grace=None)
        await drop_schemas(settings)
