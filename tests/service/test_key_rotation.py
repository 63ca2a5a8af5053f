"""Online re-encryption after a data-key rotation, on a real database, with writes going on."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from services.ops.data_keys import keys_in_use, retire_data_keys, rotate_data_keys
from services.shared.config import Settings
from services.shared.db import engine_for
from services.shared.process import ServiceSpec
from services.shared.protection import DataProtection
from services.shared.protection.envelope import new_content_key, open_content_key
from services.shared.protection.fields import FieldCipher
from services.shared.protection.keyring import DataKeyring, KeyringFile
from services.shared.protection.rotation import (
    ProtectedColumns,
    RotationProgress,
    WrappedContentKeys,
    reencrypt_table,
    rewrap_table,
    wrapped_key_id,
)

POSTGRES_URL = os.environ.get("HIE_TEST_DATABASE_URL", "")
ROWS = 1200


def _context(row: Mapping[str, Any]) -> str:
    return f"rotation_test.phone|{row['id']}"


@pytest.fixture(params=["sqlite", "postgres"])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[AsyncEngine, sa.Table]]:
    metadata = sa.MetaData()
    if request.param == "postgres":
        if not POSTGRES_URL:
            pytest.skip("HIE_TEST_DATABASE_URL not set")
        schema = f"rot_{secrets.token_hex(3)}"
        engine = create_async_engine(POSTGRES_URL)
        async with engine.begin() as conn:
            await conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        metadata = sa.MetaData(schema=schema)
    else:
        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'rotation.db'}")
        schema = ""
    table = sa.Table(
        "protected_rows",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("phone", sa.Text, nullable=True),
        sa.Column("version", sa.Integer, nullable=False),
    )
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    yield engine, table
    if schema:
        async with engine.begin() as conn:
            await conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    await engine.dispose()


def _phone(row_id: int, version: int) -> str:
    return f"1{row_id:06d}{version:04d}"


async def test_rotation_mid_traffic_loses_nothing_and_everything_decrypts_afterwards(
    database: tuple[AsyncEngine, sa.Table], tmp_path: Path
) -> None:
    engine, table = database
    key_file = tmp_path / "data-keys.json"
    old = DataKeyring.generate()
    old.save(key_file)
    before = FieldCipher(old)
    async with engine.begin() as conn:
        await conn.execute(
            sa.insert(table),
            [
                {
                    "id": i,
                    "phone": before.encrypt(_phone(i, 0), context=_context({"id": i})) if i % 10 else None,
                    "version": 0,
                }
                for i in range(ROWS)
            ],
        )

    # The rotation: a new active key written to the key file that running processes follow.
    rotated = old.rotated()
    rotated.save(key_file)
    # One writer still on the old key (it has not checked the file yet), one already on the new.
    stale_writer = FieldCipher(old)
    fresh_writer = FieldCipher(rotated, source=KeyringFile(key_file, rotated))
    expected: dict[int, str | None] = {i: _phone(i, 0) if i % 10 else None for i in range(ROWS)}

    async def traffic() -> None:
        for step in range(1, 120):
            row_id = (step * 37) % ROWS
            writer = stale_writer if step % 2 else fresh_writer
            value = _phone(row_id, step)
            async with engine.begin() as conn:
                await conn.execute(
                    sa.update(table)
                    .where(table.c.id == row_id)
                    .values(phone=writer.encrypt(value, context=_context({"id": row_id})), version=step)
                )
            expected[row_id] = value
            await asyncio.sleep(0)

    # Interrupted after its first batch, then resumed: resumption needs no bookkeeping.
    class Interrupted(Exception):
        pass

    def stop_after_first_batch(progress: RotationProgress) -> None:
        raise Interrupted

    rotation_cipher = FieldCipher(rotated, source=KeyringFile(key_file, rotated))
    with pytest.raises(Interrupted):
        await reencrypt_table(
            engine,
            table,
            columns={"phone": _context},
            cipher=rotation_cipher,
            batch_size=100,
            on_batch=stop_after_first_batch,
        )
    results = await asyncio.gather(
        traffic(),
        reencrypt_table(engine, table, columns={"phone": _context}, cipher=rotation_cipher, batch_size=100),
    )
    progress = results[1]
    assert progress.unreadable == []
    # The stale writer may have written under the old key after the last pass: a final run sweeps it.
    await reencrypt_table(engine, table, columns={"phone": _context}, cipher=rotation_cipher)

    survivor = FieldCipher(rotated.without({old.active.id}))
    async with engine.connect() as conn:
        rows = (await conn.execute(sa.select(table).order_by(table.c.id))).mappings().all()
    assert len(rows) == ROWS
    for row in rows:
        if row["phone"] is None:
            assert expected[row["id"]] is None
            continue
        assert not survivor.needs_rotation(row["phone"])
        assert survivor.decrypt(row["phone"], context=_context(row)) == expected[row["id"]]


async def test_a_tampered_value_is_reported_and_left_alone_not_rewritten(
    database: tuple[AsyncEngine, sa.Table],
) -> None:
    engine, table = database
    old = DataKeyring.generate("sm")
    cipher = FieldCipher(old)
    async with engine.begin() as conn:
        await conn.execute(
            sa.insert(table),
            [
                {"id": i, "phone": cipher.encrypt(_phone(i, 0), context=_context({"id": i})), "version": 0}
                for i in range(5)
            ],
        )
        # Swap two rows' ciphertexts: each is valid, but in the wrong place.
        swapped = (
            await conn.execute(sa.select(table.c.phone).where(table.c.id.in_([1, 2])).order_by(table.c.id))
        ).all()
        await conn.execute(sa.update(table).where(table.c.id == 1).values(phone=swapped[1][0]))
        await conn.execute(sa.update(table).where(table.c.id == 2).values(phone=swapped[0][0]))

    progress = await reencrypt_table(engine, table, columns={"phone": _context}, cipher=FieldCipher(old.rotated()))
    assert sorted(progress.unreadable) == [1, 2]
    assert progress.reencrypted == 3
    async with engine.connect() as conn:
        kept = (await conn.execute(sa.select(table.c.phone).where(table.c.id == 1))).scalar_one()
    assert kept == swapped[1][0]


async def test_document_keys_are_rewrapped_and_content_stays_readable(
    database: tuple[AsyncEngine, sa.Table],
) -> None:
    engine, phones = database
    documents = sa.Table(
        "protected_documents",
        phones.metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("document_id", sa.Text, nullable=False),
        sa.Column("wrapped_key", sa.LargeBinary, nullable=False),
        sa.Column("chunk", sa.LargeBinary, nullable=False),
    )
    async with engine.begin() as conn:
        await conn.run_sync(documents.create)
    old = DataKeyring.generate()
    rows = []
    for i in range(30):
        key = new_content_key(old, document_id=f"doc-{i}", suite="aes")
        rows.append(
            {
                "id": i,
                "document_id": f"doc-{i}",
                "wrapped_key": key.wrapped,
                "chunk": key.seal_chunk(0, f"出院小结 {i}".encode(), final=True),
            }
        )
    async with engine.begin() as conn:
        await conn.execute(sa.insert(documents), rows)

    rotated = old.rotated("sm")
    progress = await rewrap_table(
        engine, documents, document_id_column="document_id", wrapped_column="wrapped_key", kek=rotated, batch_size=7
    )
    assert (progress.reencrypted, progress.unreadable) == (30, [])
    again = await rewrap_table(
        engine, documents, document_id_column="document_id", wrapped_column="wrapped_key", kek=rotated
    )
    assert again.reencrypted == 0  # nothing left: a second run is a no-op

    survivor = rotated.without({old.active.id})
    async with engine.connect() as conn:
        stored = (await conn.execute(sa.select(documents).order_by(documents.c.id))).mappings().all()
    for row in stored:
        assert wrapped_key_id(row["wrapped_key"]) == rotated.active.id
        key = open_content_key(survivor, document_id=row["document_id"], wrapped=row["wrapped_key"])
        assert key.open_chunk(0, row["chunk"], final=True) == f"出院小结 {row['id']}".encode()


async def test_hie_keys_rotate_data_then_retire_data(tmp_path: Path) -> None:
    """The operator's commands over a component's protected columns and document keys."""
    env = {"HIE_DATA_DIR": str(tmp_path)}
    if POSTGRES_URL:
        env |= {"HIE_DATABASE_URL": POSTGRES_URL, "HIE_DB_SCHEMA_PREFIX": f"r{secrets.token_hex(3)}_"}
    settings = Settings.from_env(env)
    metadata = sa.MetaData()
    patients = sa.Table(
        "patients", metadata, sa.Column("id", sa.Integer, primary_key=True), sa.Column("phone", sa.Text)
    )
    contents = sa.Table(
        "contents",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("document_id", sa.Text),
        sa.Column("wrapped_key", sa.LargeBinary),
    )
    spec = ServiceSpec(
        name="probe",
        metadata=metadata,
        versions=tmp_path,
        build=lambda runtime: [],
        protects_personal_data=True,
        protected=(
            ProtectedColumns("patients", {"phone": lambda row: f"probe.patients.phone|{row['id']}"}),
            WrappedContentKeys("contents", "document_id", "wrapped_key"),
        ),
    )
    protection = DataProtection.from_settings(settings)
    first_key = protection.keyring.active.id
    engine = engine_for(settings, "probe")
    try:
        async with engine.begin() as conn:
            if POSTGRES_URL:
                await conn.execute(sa.text(f'CREATE SCHEMA "{settings.schema_for("probe")}"'))
            await conn.run_sync(metadata.create_all)
            await conn.execute(
                sa.insert(patients),
                [
                    {
                        "id": i,
                        "phone": protection.fields.encrypt(f"1380000{i:04d}", context=f"probe.patients.phone|{i}"),
                    }
                    for i in range(50)
                ],
            )
            await conn.execute(
                sa.insert(contents),
                [
                    {"id": i, "document_id": f"d{i}", "wrapped_key": protection.new_content_key(f"d{i}").wrapped}
                    for i in range(5)
                ]
                # An entry with no content of its own (an imaging reference) has no key.
                + [{"id": 99, "document_id": "imaging", "wrapped_key": None}],
            )
        assert await retire_data_keys(settings, specs=[spec]) == []  # only the active key exists

        report = await rotate_data_keys(settings, specs=[spec], suite="sm", settle_seconds=0, echo=lambda _: None)
        assert report.old_key == first_key
        assert [(p.table, p.reencrypted) for _name, p in report.tables] == [("patients", 50), ("contents", 5)]
        assert await keys_in_use(settings, specs=[spec]) == {report.new_key}
        assert await retire_data_keys(settings, specs=[spec]) == [first_key]

        after = DataProtection.from_settings(settings)
        assert after.keyring.key_ids == [report.new_key]
        async with engine.connect() as conn:
            for row in (await conn.execute(sa.select(patients))).mappings():
                assert after.fields.decrypt(row["phone"], context=f"probe.patients.phone|{row['id']}") == (
                    f"1380000{row['id']:04d}"
                )
            for row in (await conn.execute(sa.select(contents).where(contents.c.wrapped_key.is_not(None)))).mappings():
                after.open_content_key(row["document_id"], row["wrapped_key"])
    finally:
        if POSTGRES_URL:
            async with engine.begin() as conn:
                await conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{settings.schema_for("probe")}" CASCADE'))
        await engine.dispose()
