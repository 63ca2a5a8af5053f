"""Migration 0005 of the teleconsult service: consultations stored before free text was sealed
keep their question and history reasons, sealed in place (no clear copy left), readable through
the service. Real database (SQLite and PostgreSQL), real migrations, real teleconsult service."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command

from services.shared import workflow
from services.shared.db import engine_for, ensure_schema
from services.shared.migrations import alembic_config
from services.shared.process import start_service
from services.teleconsult.service import SPEC as TELECONSULT
from services.teleconsult.store import ConsultationRecord, history_context, sealed_context
from tests.conftest import _backends, base_settings, drop_schemas

_QUESTION = "右肺上叶结节，性质待定，请远程会诊"
_ACCEPTED = "同意会诊，今日出具报告"


@pytest.mark.parametrize("backend", _backends())
async def test_existing_consultations_are_sealed_in_place(backend: str, tmp_path: Path, keys_dir: Path) -> None:
    settings = base_settings(tmp_path, keys_dir, backend)
    engine = engine_for(settings, "teleconsult")
    try:
        await ensure_schema(engine, settings.schema_for("teleconsult"))
        async with engine.begin() as conn:
            await conn.run_sync(
                lambda sync: command.upgrade(alembic_config(TELECONSULT.versions, TELECONSULT.metadata, sync), "0004")
            )
            now = datetime.datetime.now(datetime.UTC)
            await conn.execute(
                sa.text(
                    "INSERT INTO consultation (id, patient_domain, patient_local_id, requester_organization_id, "
                    "consultant_organization_id, kind, mode, question, state, version, document_ids, "
                    "idempotency_key, created_at) "
                    "VALUES ('c-1', 'org-q', 'L-1', 'org-q', 'org-c', 1, 1, :q, 2, 1, '[]', 'k-1', :now)"
                ),
                {"q": _QUESTION, "now": now},
            )
            await conn.execute(
                sa.text(
                    "INSERT INTO consultation_state_change (id, consultation_id, from_state, to_state, move, "
                    "organization_id, practitioner_id, role, reason, request_key, changed_at) "
                    "VALUES ('h-1', 'c-1', 1, 2, 'accept', 'org-c', 'D-1', 'doctor', :reason, '', :now)"
                ),
                {"reason": _ACCEPTED, "now": now},
            )
    finally:
        await engine.dispose()

    running = await start_service(TELECONSULT, settings, listen="127.0.0.1:0")
    try:
        async with running.runtime.engine.connect() as conn:
            row = (await conn.execute(sa.text("SELECT question, sealed FROM consultation WHERE id = 'c-1'"))).one()
            history = await conn.scalar(sa.text("SELECT reason FROM consultation_state_change WHERE id = 'h-1'"))
        assert row.question == ""
        assert _QUESTION not in row.sealed
        assert _ACCEPTED not in history
        fields = running.runtime.protection.fields  # type: ignore[union-attr]
        assert _QUESTION in fields.decrypt(row.sealed, context=sealed_context("c-1"))
        assert fields.decrypt(history, context=history_context("h-1")) == _ACCEPTED
        servicer = workflow.attached(running.runtime)
        async with running.runtime.sessions() as session:
            record = await session.get(ConsultationRecord, "c-1")
            assert record is not None
            assert servicer._form(record)["question"] == _QUESTION
            message = await servicer._message(session, record)
        assert [h.reason for h in message.history] == [_ACCEPTED]
    finally:
        await running.stop(grace=None)
        await drop_schemas(settings)
