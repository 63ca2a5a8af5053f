"""`hie bench load`: its nothing-lost check catches what it is there to catch, and the whole
benchmark runs end to end at a tiny scale (figures are not asserted: speed is measured by the
command, never by a test)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy import delete, select, update

from services.audit import store as audit_store
from services.ops.bench_load import WRITE_AUDIT_TYPES, Traffic, build_region, check_writes
from services.registry import store as registry_store
from services.teleconsult import workflow as teleconsult_workflow
from services.teleconsult.store import ConsultationRecord
from tests.conftest import POSTGRES_URL, Exchange

pytestmark = pytest.mark.load


OPS = (
    "register_document",
    "register_document",
    "register_document",
    "referral_create",
    "referral_accept",
    "consultation_request",
    "consultation_consent",
    "consultation_accept",
)
CREATED = {"register_document", "referral_create", "consultation_request"}


async def test_the_check_catches_a_lost_write_and_a_duplicated_audit_record(exchange: Exchange) -> None:
    region = await build_region(exchange.settings, exchange.base_url, patients=10, documents=20, echo=lambda _: None)
    traffic = Traffic(region, random.Random(7))
    for op in OPS:
        sent, status, reason = await traffic.run(op)
        assert (sent, status, reason) == (op, 201 if op in CREATED else 200, "")
    await exchange.audit_settled()

    clean = await check_writes(region)
    assert clean.ok, clean.as_dict()
    assert [w.op for w in region.writes] == list(OPS)
    # The check's own reads are audited too: let those land before writing into the chain by hand
    # (the audit service serialises its appends in-process; this test's insert is outside that).
    await exchange.audit_settled()

    lost, duplicated = region.writes[0], region.writes[3]
    lost_move, duplicated_move = region.writes[7], region.writes[6]
    # A lost write: the registry no longer holds a document it acknowledged.
    async with exchange.services["registry"].runtime.sessions() as session, session.begin():
        await session.execute(
            delete(registry_store.DocumentChunk).where(registry_store.DocumentChunk.document_id == lost.key)
        )
        await session.execute(
            delete(registry_store.DocumentEntryRecord).where(registry_store.DocumentEntryRecord.id == lost.key)
        )
    # A lost consultation move: the consultation is back where it was before its acceptance.
    async with exchange.services["teleconsult"].runtime.sessions() as session, session.begin():
        await session.execute(
            update(ConsultationRecord)
            .where(ConsultationRecord.id == lost_move.key)
            .values(state=teleconsult_workflow.REQUESTED)
        )
    # Duplicated audit records: the referral's creation and the consultation's informed consent
    # recorded twice, properly chained (so the chain still verifies: only counting per
    # acknowledged write finds them).
    for write in (duplicated, duplicated_move):
        async with exchange.services["audit"].runtime.sessions() as session, session.begin():
            await audit_store.lock_chain(session)
            original = (
                await session.scalars(
                    select(audit_store.AuditRecord).where(
                        audit_store.AuditRecord.trace_id == write.trace_id,
                        audit_store.AuditRecord.type == WRITE_AUDIT_TYPES[write.op],
                    )
                )
            ).one()
            fields = original.as_mapping()
            for derived in ("sequence", "previous_hash", "hash"):
                fields.pop(derived, None)
            fields.pop("id", None)
            fields["event_id"] = str(uuid.uuid4())
            await audit_store.append(session, fields, await audit_store.chain_head(session))

    verdict = await check_writes(region, settle_seconds=1)
    assert [w.key for w in verdict.lost] == [lost.key, lost_move.key]
    assert [w.trace_id for w in verdict.audited_twice] == [duplicated.trace_id, duplicated_move.trace_id]
    assert verdict.unaudited == []
    assert verdict.chain_intact
    assert not verdict.ok


def test_the_benchmark_runs_end_to_end_at_a_tiny_scale(tmp_path: Path) -> None:
    """On PostgreSQL when the tests have it (as the benchmark is meant to run), else on SQLite."""
    database_url = POSTGRES_URL
    output = tmp_path / "load.json"
    args = ["--patients", "12", "--documents", "24", "--seconds", "2", "--clients", "2", "--rate", "10"]
    env = {k: v for k, v in os.environ.items() if k != "HIE_DATABASE_URL"}
    if database_url:
        args += ["--database-url", database_url]
    done = subprocess.run(
        [sys.executable, "-m", "services.ops.cli", "bench", "load", *args, "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=280,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    result = json.loads(output.read_text())
    assert result["documents"] == 24
    assert [r["mode"] for r in result["runs"]] == ["closed", "open"]
    for run in result["runs"]:
        assert run["requests"] > 0
        assert run["cpu_seconds"]["gateway"] > 0
        assert {"p50_ms", "p95_ms", "p99_ms"} <= set(next(iter(run["operations"].values())))
    assert result["correctness"]["ok"], result["correctness"]
    assert "p99 ms" in done.stdout
    assert "audit chain intact" in done.stdout
