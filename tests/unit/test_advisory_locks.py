"""Advisory locks are database-wide: the mpi's blocking-key locks and the audit chain lock of one
exchange (schema prefix) must not make another exchange in the same database wait."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from services.audit import store as audit_store
from services.mpi.index import MasterIndex
from services.shared import db

POSTGRES_URL = os.environ.get("HIE_TEST_DATABASE_URL", "")
pytestmark = pytest.mark.skipif(not POSTGRES_URL, reason="HIE_TEST_DATABASE_URL not set")
KEYS = ["py:zhangwei|1980", "bd:1980-01-01|M", "nid:110101198001011234"]


@pytest.fixture
async def two_schemas() -> AsyncIterator[tuple[db.AsyncEngine, db.AsyncEngine]]:
    names = [f"t{secrets.token_hex(3)}_lock{i}" for i in (1, 2)]
    engines = [db.create_engine(POSTGRES_URL, schema=name) for name in names]
    for engine, name in zip(engines, names, strict=True):
        await db.ensure_schema(engine, name)
    yield engines[0], engines[1]
    for engine, name in zip(engines, names, strict=True):
        async with engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
        await engine.dispose()


async def _waits(session: AsyncSession, take: object) -> bool:
    """Whether taking the lock waits (lock_timeout: a short wait is a refusal, not a hang)."""
    await session.execute(text("SET LOCAL lock_timeout = '300ms'"))
    try:
        await take  # type: ignore[misc]
    except DBAPIError:
        return True
    return False


async def test_blocking_key_locks_hold_within_a_schema_and_not_across(two_schemas) -> None:  # type: ignore[no-untyped-def]
    first, other = two_schemas
    index = MasterIndex.__new__(MasterIndex)  # lock() needs no audit trail, outbox or parameters
    async with db.session_factory(first)() as holder, holder.begin():
        await index.lock(holder, KEYS)
        async with db.session_factory(other)() as elsewhere, elsewhere.begin():
            assert not await _waits(elsewhere, index.lock(elsewhere, KEYS))
        async with db.session_factory(first)() as same, same.begin():
            assert await _waits(same, index.lock(same, KEYS[:1]))


async def test_the_audit_chain_lock_is_per_schema(two_schemas) -> None:  # type: ignore[no-untyped-def]
    first, other = two_schemas
    async with db.session_factory(first)() as holder, holder.begin():
        await audit_store.lock_chain(holder)
        async with db.session_factory(other)() as elsewhere, elsewhere.begin():
            assert not await _waits(elsewhere, audit_store.lock_chain(elsewhere))
        async with db.session_factory(first)() as same, same.begin():
            assert await _waits(same, audit_store.lock_chain(same))
