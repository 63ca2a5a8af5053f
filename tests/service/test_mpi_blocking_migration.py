"""Migrations 0006, 0008, 0010 and 0011: records stored before matching blocked on birth date + family name
(0006), or on the typo-tolerant keys (0008), are filed under those keys, so a registration found
only by them still meets its person. Real gRPC server, real database (SQLite and PostgreSQL)."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from hie.mpi.v1 import mpi_pb2
from services.mpi.sealing import RecordSealing
from services.mpi.service import SPEC as MPI
from services.shared.process import RunningService, start_service
from tests.conftest import _backends, base_settings, drop_schemas
from tests.support.hospital import Hospital, tasks_for

pytestmark = pytest.mark.filterwarnings("ignore")

# 秀英 / 秀芳 read differently, so name + birth year does not find one from the other; nothing
# else is shared but the birth date, the family name and the address.
_FIRST = {"gender": mpi_pb2.GENDER_FEMALE, "birth_date": "1980-05-05", "line": "西城区金融街7号"}


async def _started(settings: object) -> RunningService:
    running = await start_service(MPI, settings, listen="127.0.0.1:0")  # type: ignore[arg-type]
    running.runtime.outbox.poll_interval = 3600  # no audit service here: events stay in the outbox
    return running


@pytest.mark.parametrize("backend", _backends())
async def test_the_migration_files_existing_records_under_birth_date_and_family_name(
    backend: str, tmp_path: Path, keys_dir: Path
) -> None:
    settings = base_settings(tmp_path, keys_dir, backend)
    running = await _started(settings)
    try:
        first = Hospital(running, keys_dir)
        stored = await first.register("A-1", "张秀英", **_FIRST)
        assert running.runtime.protection is not None
        digest = RecordSealing(running.runtime.protection).key("d:1980-05-05:zhang")
        # The record as an earlier schema left it: without its birth date + family key.
        async with running.runtime.engine.begin() as conn:
            removed = await conn.execute(sa.text("DELETE FROM blocking_key WHERE key = :k"), {"k": digest})
            assert removed.rowcount == 1
            await conn.execute(sa.text("UPDATE alembic_version SET version_num = '0005'"))
            # Later migrations run again from 0005: their changes are undone too (0007's column,
            # 0008's and 0009's tables).
            await conn.execute(sa.text("ALTER TABLE inbound_message DROP COLUMN digest"))
            await conn.execute(sa.text("DROP TABLE match_estimate"))
            await conn.execute(sa.text("DROP TABLE idempotent_answer"))
    finally:
        await running.stop(grace=None)

    running = await _started(settings)
    try:
        async with running.runtime.engine.connect() as conn:
            filed = await conn.scalar(sa.text("SELECT count(*) FROM blocking_key WHERE key = :k"), {"k": digest})
        assert filed == 1
        second = Hospital(running, keys_dir)
        got = await second.register("B-1", "张秀芳", **_FIRST)
        tasks = await tasks_for(second, "B-1")
        assert got.patient.enterprise_id == stored.patient.enterprise_id or [
            t.candidate.ref.local_id for t in tasks
        ] == ["A-1"]
    finally:
        await running.stop(grace=None)
        await drop_schemas(settings)


@pytest.mark.parametrize("backend", _backends())
async def test_0008_files_existing_records_under_the_typo_tolerant_keys(
    backend: str, tmp_path: Path, keys_dir: Path
) -> None:
    settings = base_settings(tmp_path, keys_dir, backend)
    running = await _started(settings)
    line = {"birth_date": "1971-08-30", "line": "12 Pinkerton Circuit", "postal_code": "4012"}
    try:
        first = Hospital(running, keys_dir)
        stored = await first.register("A-1", "Lodge, Joel", **line)
        assert running.runtime.protection is not None
        sealing = RecordSealing(running.runtime.protection)
        digests = [sealing.key(k) for k in ("di:1971-08-30:l", "di:1971-08-30:j", "pp:4012:lod", "pp:4012:joe")]
        digests += [sealing.key(k) for k in ("bp:1971-08-30:4012", "sp:12:lod", "sp:12:joe")]
        async with running.runtime.engine.begin() as conn:
            for digest in digests:
                removed = await conn.execute(sa.text("DELETE FROM blocking_key WHERE key = :k"), {"k": digest})
                assert removed.rowcount == 1
            await conn.execute(sa.text("UPDATE alembic_version SET version_num = '0007'"))
            await conn.execute(sa.text("DROP TABLE match_estimate"))
            await conn.execute(sa.text("DROP TABLE idempotent_answer"))  # 0009 runs again too
    finally:
        await running.stop(grace=None)

    running = await _started(settings)
    try:
        async with running.runtime.engine.connect() as conn:
            for digest in digests:
                filed = await conn.scalar(sa.text("SELECT count(*) FROM blocking_key WHERE key = :k"), {"k": digest})
                assert filed == 1
        # A typo in the family name and the birth day: only the new keys find the record.
        second = Hospital(running, keys_dir)
        got = await second.register(
            "B-1", "Lodgw, Joel", birth_date="1971-08-03", line="12 Pinkerton Circuit", postal_code="4012"
        )
        tasks = await tasks_for(second, "B-1")
        assert got.patient.enterprise_id == stored.patient.enterprise_id or [
            t.candidate.ref.local_id for t in tasks
        ] == ["A-1"]
    finally:
        await running.stop(grace=None)
        await drop_schemas(settings)


@pytest.mark.parametrize("backend", _backends())
async def test_0010_files_existing_records_under_their_street(backend: str, tmp_path: Path, keys_dir: Path) -> None:
    settings = base_settings(tmp_path, keys_dir, backend)
    running = await _started(settings)
    try:
        first = Hospital(running, keys_dir)
        stored = await first.register(
            "A-1", "Lodge, Joel", birth_date="1971-08-30", line="12 Pinkerton Circuit", postal_code="4012"
        )
        assert running.runtime.protection is not None
        digest = RecordSealing(running.runtime.protection).key("sw:4012:pink")
        async with running.runtime.engine.begin() as conn:
            removed = await conn.execute(sa.text("DELETE FROM blocking_key WHERE key = :k"), {"k": digest})
            assert removed.rowcount == 1
            await conn.execute(sa.text("UPDATE alembic_version SET version_num = '0009'"))
    finally:
        await running.stop(grace=None)

    running = await _started(settings)
    try:
        async with running.runtime.engine.connect() as conn:
            filed = await conn.scalar(sa.text("SELECT count(*) FROM blocking_key WHERE key = :k"), {"k": digest})
        assert filed == 1
        # Both name parts mistyped in their first three letters, the birth date replaced and the
        # house number mistyped: only the street with the postcode is left to find the record.
        second = Hospital(running, keys_dir)
        got = await second.register(
            "B-1", "Lpdge, Jowl", birth_date="1917-08-30", line="21 Pinkerton Circuit", postal_code="4012"
        )
        tasks = await tasks_for(second, "B-1")
        assert got.patient.enterprise_id == stored.patient.enterprise_id or [
            t.candidate.ref.local_id for t in tasks
        ] == ["A-1"]
    finally:
        await running.stop(grace=None)
        await drop_schemas(settings)


@pytest.mark.parametrize("backend", _backends())
async def test_0011_files_existing_records_under_their_locality_and_name(
    backend: str, tmp_path: Path, keys_dir: Path
) -> None:
    settings = base_settings(tmp_path, keys_dir, backend)
    running = await _started(settings)
    try:
        first = Hospital(running, keys_dir)
        stored = await first.register(
            "A-1",
            "Ryan, Joel",
            birth_date="1972-06-15",
            line="62 Lancaster Hill",
            district="Forest Hill",
            postal_code="0370",
        )
        assert running.runtime.protection is not None
        sealing = RecordSealing(running.runtime.protection)
        digests = [sealing.key(k) for k in ("lp:foresthill:rya", "lp:foresthill:joe")]
        async with running.runtime.engine.begin() as conn:
            for digest in digests:
                removed = await conn.execute(sa.text("DELETE FROM blocking_key WHERE key = :k"), {"k": digest})
                assert removed.rowcount == 1
            await conn.execute(sa.text("UPDATE alembic_version SET version_num = '0010'"))
    finally:
        await running.stop(grace=None)

    running = await _started(settings)
    try:
        async with running.runtime.engine.connect() as conn:
            for digest in digests:
                filed = await conn.scalar(sa.text("SELECT count(*) FROM blocking_key WHERE key = :k"), {"k": digest})
                assert filed == 1
        # The postcode's digits transposed, the house number and street mistyped, the birth date
        # replaced and a typo in the family name: only the locality with the name is left.
        second = Hospital(running, keys_dir)
        got = await second.register(
            "B-1",
            "Ryamn, Joel",
            birth_date="1927-06-15",
            line="26 Lnacaster Hlil",
            district="foresthill",
            postal_code="3070",
        )
        tasks = await tasks_for(second, "B-1")
        assert got.patient.enterprise_id == stored.patient.enterprise_id or [
            t.candidate.ref.local_id for t in tasks
        ] == ["A-1"]
    finally:
        await running.stop(grace=None)
        await drop_schemas(settings)
