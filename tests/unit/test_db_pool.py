"""Pooled PostgreSQL connections: pinged only after sitting idle, a dead one replaced, and the
connections of a burst kept for the next one."""

from __future__ import annotations

import contextlib
import os

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from services.shared import db

POSTGRES_URL = os.environ.get("HIE_TEST_DATABASE_URL", "")
pytestmark = pytest.mark.skipif(not POSTGRES_URL, reason="HIE_TEST_DATABASE_URL not set")


async def _sent_by(engine: db.AsyncEngine, transactions: int) -> list[str]:
    """Every statement the one pooled connection sends over `transactions` short transactions."""
    sent: list[str] = []
    async with engine.connect() as conn:
        driver = (await conn.get_raw_connection()).driver_connection
        driver.add_query_logger(lambda record: sent.append(record.query))  # type: ignore[union-attr]
    for _ in range(transactions):
        async with engine.begin() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar() == 1
    return sent


async def test_a_connection_in_steady_use_is_not_pinged() -> None:
    engine = db.create_engine(POSTGRES_URL, schema="public")
    try:
        sent = await _sent_by(engine, 5)
        # Only the transactions themselves: no ping's BEGIN / ";" / ROLLBACK around each checkout.
        assert sent == ["BEGIN;", "COMMIT;"] * 5
    finally:
        await engine.dispose()


async def test_an_idle_connection_is_pinged_and_a_dead_one_replaced() -> None:
    engine = create_async_engine(POSTGRES_URL, pool_size=1)
    db.ping_when_idle(engine, idle_seconds=0.0)  # every checkout counts as after an idle period
    try:
        sent = await _sent_by(engine, 2)
        assert len([q for q in sent if q.strip() == ";"]) == 2
        async with engine.connect() as conn:
            pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar()
        other = create_async_engine(POSTGRES_URL)
        try:
            async with other.connect() as conn:
                assert (await conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})).scalar()
        finally:
            await other.dispose()
        async with engine.connect() as conn:
            fresh = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar()
        assert fresh != pid
    finally:
        await engine.dispose()


async def _backends_of_a_burst(engine: db.AsyncEngine, size: int) -> set[int]:
    """The backend pids of `size` connections checked out at once, then all returned."""
    async with contextlib.AsyncExitStack() as stack:
        connections = [await stack.enter_async_context(engine.connect()) for _ in range(size)]
        return {(await c.execute(text("SELECT pg_backend_pid()"))).scalar_one() for c in connections}


async def test_a_burst_of_requests_reuses_the_connections_of_the_last_one() -> None:
    # 16 at once is `hie bench load`'s 16 clients each holding a registry connection. Pooled
    # connections beyond the kept ones were closed at check-in and opened again by the next
    # burst (about 200 new PostgreSQL sessions per 30 s of document queries, issue 21): each a
    # backend started, authenticated and every statement prepared again.
    engine = db.create_engine(POSTGRES_URL, schema="public")
    try:
        first = await _backends_of_a_burst(engine, 16)
        second = await _backends_of_a_burst(engine, 16)
        assert len(first) == 16
        assert second == first
    finally:
        await engine.dispose()
