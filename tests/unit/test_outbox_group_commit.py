"""`Outbox.add_now`: the audit events of concurrent reads committed together, each exactly once,
before any of those reads returns; a failed insert fails its callers and nothing after them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import MetaData, event, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from services.shared.db import session_factory
from services.shared.outbox import Outbox, outbox_table


@pytest.fixture
async def outbox(tmp_path: Path) -> AsyncIterator[tuple[Outbox, async_sessionmaker[AsyncSession], list[str]]]:
    """An outbox on a real SQLite file, and the INSERT statements its engine executes."""
    metadata = MetaData()
    table = outbox_table(metadata)
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'outbox.db'}")
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    inserts: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT"):
            inserts.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", count)
    sessions = session_factory(engine)
    try:
        yield Outbox(table, sessions), sessions, inserts
    finally:
        await engine.dispose()


async def test_concurrent_messages_are_each_stored_once_in_fewer_inserts(outbox) -> None:  # type: ignore[no-untyped-def]
    box, sessions, inserts = outbox
    ids = await asyncio.gather(*(box.add_now("audit", f"event-{i}".encode()) for i in range(50)))
    assert len(set(ids)) == 50
    table = box._table
    async with sessions() as session:
        rows = (await session.execute(select(table.c.id, table.c.payload))).all()
    # Committed when add_now returned: every message there, once, with its own id.
    assert sorted(r.id for r in rows) == sorted(ids)
    assert sorted(r.payload for r in rows) == sorted(f"event-{i}".encode() for i in range(50))
    # The first went in alone; the others waited for it and went in together.
    assert len(inserts) < 50


async def test_a_failed_insert_fails_its_callers_and_the_next_message_goes_in(outbox) -> None:  # type: ignore[no-untyped-def]
    box, sessions, _inserts = outbox
    with pytest.raises(IntegrityError):
        await box.add_now("audit", None)  # type: ignore[arg-type]
    message_id = await box.add_now("audit", b"after")
    async with sessions() as session:
        count = await session.scalar(select(func.count()).select_from(box._table))
        stored = await session.scalar(select(box._table.c.payload).where(box._table.c.id == message_id))
    assert count == 1
    assert stored == b"after"
