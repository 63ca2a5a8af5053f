"""The gateway's user assertion ledger on PostgreSQL: the jtis of requests waiting together go to
the database in one statement, and a jti is still accepted exactly once, within a batch, across
batches and across two gateway replicas."""

from __future__ import annotations

import asyncio
import datetime
import os
import secrets
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from gateway import store
from services.shared.db import utcnow

POSTGRES_URL = os.environ.get("HIE_TEST_DATABASE_URL", "")
pytestmark = pytest.mark.skipif(not POSTGRES_URL, reason="HIE_TEST_DATABASE_URL not set")


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    name = f"ledger_{secrets.token_hex(4)}"
    engine = create_async_engine(POSTGRES_URL)
    async with engine.begin() as conn:
        await conn.execute(text(f'CREATE SCHEMA "{name}"'))
        await conn.execute(text(f'SET search_path TO "{name}"'))
        await conn.run_sync(store.metadata.create_all, tables=[store.UsedAssertion.__table__])
    try:
        yield name
    finally:
        async with engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA "{name}" CASCADE'))
        await engine.dispose()


def _ledger(schema: str) -> store.UserAssertionLedger:
    return store.UserAssertionLedger(None, url=POSTGRES_URL, schema=schema)  # type: ignore[arg-type]


def _statements(ledger: store.UserAssertionLedger) -> list[str]:
    sent: list[str] = []
    assert ledger._engine is not None
    event.listen(ledger._engine.sync_engine, "before_cursor_execute", lambda *a: sent.append(a[2]))
    return sent


def _expires() -> datetime.datetime:
    # Per use, not at import: the full run reaches this module minutes after collecting it, and a
    # ledger prunes jtis whose expiry has passed (a pruned "same" was accepted again).
    return utcnow() + datetime.timedelta(minutes=5)


async def test_requests_waiting_together_share_one_statement(schema: str) -> None:
    ledger = _ledger(schema)
    sent = _statements(ledger)
    try:
        fresh = await asyncio.gather(
            *(ledger.remember(jti=f"j{i}", client_id="c", expires_at=_expires()) for i in range(40))
        )
        assert fresh == [True] * 40
        inserts = [s for s in sent if s.startswith("INSERT")]
        # One batch on its way at a time: 40 requests never take 40 statements.
        assert 1 <= len(inserts) <= 2, inserts
        # Each jti is now used: every second use is refused.
        again = await asyncio.gather(
            *(ledger.remember(jti=f"j{i}", client_id="c", expires_at=_expires()) for i in range(40))
        )
        assert again == [False] * 40
    finally:
        await ledger.close()


async def test_one_jti_is_accepted_once_within_a_batch_and_across_replicas(schema: str) -> None:
    first, second = _ledger(schema), _ledger(schema)
    try:
        # Two other jtis take the statements on their way; the ten uses of "batched" wait
        # together and go in one statement.
        outcomes = await asyncio.gather(
            first.remember(jti="a", client_id="c", expires_at=_expires()),
            first.remember(jti="b", client_id="c", expires_at=_expires()),
            *(first.remember(jti="batched", client_id="c", expires_at=_expires()) for _ in range(10)),
        )
        assert outcomes[:2] == [True, True]
        assert sorted(outcomes[2:]) == [False] * 9 + [True]
        # Two replicas, each with its own ledger on the one table.
        uses = [
            ledger.remember(jti="same", client_id="c", expires_at=_expires())
            for _ in range(10)
            for ledger in (first, second)
        ]
        assert sorted(await asyncio.gather(*uses)) == [False] * 19 + [True]
        # Another client's jti of the same value is its own.
        assert await first.remember(jti="same", client_id="other", expires_at=_expires())
    finally:
        await first.close()
        await second.close()


async def test_a_database_fault_reaches_every_waiting_request(schema: str) -> None:
    ledger = _ledger(f"{schema}_missing")
    try:
        outcomes = await asyncio.gather(
            *(ledger.remember(jti=f"j{i}", client_id="c", expires_at=_expires()) for i in range(5)),
            return_exceptions=True,
        )
        assert all(isinstance(outcome, DBAPIError) for outcome in outcomes), outcomes
    finally:
        await ledger.close()
