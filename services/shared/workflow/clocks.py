"""Deadline clocks: a scanner that fires each breached clock exactly once.

A clock row (engine.clock_table) is due when it is neither fired, stopped nor paused and its due
time has passed. One scan takes the due rows and, per row in the same transaction, marks it fired,
records the audit event `<kind>.deadline-breach` (attributed to the organisation whose move is
late, so the authority finds it by organisation) and notifies both sides. Because the mark and its
effects commit together and a row is taken only while unfired, a crash between scans or a restart
fires nothing twice and loses nothing: the next scan finds what is still due.

Exactly one replica scans at a time: on PostgreSQL a scan runs under a transaction-level advisory
lock named after the service's schema (a replica that does not get it skips the round) and takes
the rows FOR UPDATE SKIP LOCKED besides; SQLite is one process.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from sqlalchemy import select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from services.shared.audit_trail import Action
from services.shared.auth import PLATFORM, Caller
from services.shared.process import ServiceRuntime
from services.shared.workflow.engine import Subject, WorkflowEngine

_log = logging.getLogger(__name__)
_BATCH = 100
# Whose move a clock waits for: the organisation(s) a breach is attributed to (one audit event each;
# several while candidates are asked and none has accepted).
Responsible = Callable[[str, Subject], Sequence[str]]
# The service's mapping of an item (by id) inside the scan's transaction; None if it is gone.
Describe = Callable[[AsyncSession, str], Awaitable[Subject | None]]


class DeadlineScanner:
    """Fires breached clocks of one workflow kind (see the module docstring)."""

    def __init__(
        self,
        runtime: ServiceRuntime,
        engine: WorkflowEngine,
        *,
        describe: Describe,
        responsible: Responsible,
        interval: float = 15.0,
    ) -> None:
        self._rt = runtime
        self._engine = engine
        self._describe = describe
        self._responsible = responsible
        self.interval = interval

    async def run(self) -> None:
        """Scan every `interval` seconds for the life of the service."""
        while True:
            try:
                while await self.scan_once() >= _BATCH:
                    pass
            except Exception as exc:  # the scanner must outlive any one failure
                _log.warning("deadline scan failed: %s", type(exc).__name__)
            await asyncio.sleep(self.interval)

    async def scan_once(self) -> int:
        """Fire the clocks due now (by the engine's time source); returns how many fired."""
        c = self._engine.tables.clocks
        now = self._engine.now()
        fired = 0
        async with self._rt.sessions() as session, session.begin():
            if session.bind.dialect.name == "postgresql":
                schema = self._rt.settings.schema_for(self._rt.name)
                got = await session.scalar(
                    text("SELECT pg_try_advisory_xact_lock(hashtext(:k))"), {"k": f"workflow-clocks:{schema}"}
                )
                if not got:
                    return 0
            query = (
                select(c.c.id, c.c.item_id, c.c.name)
                .where(c.c.fired_at.is_(None), c.c.stopped_at.is_(None), c.c.paused_at.is_(None), c.c.due_at <= now)
                .order_by(c.c.due_at)
                .limit(_BATCH)
            )
            if session.bind.dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True)
            rows = (await session.execute(query)).all()
            for row in rows:
                marked = await session.execute(
                    update(c).where(c.c.id == row.id, c.c.fired_at.is_(None)).values(fired_at=now)
                )
                if marked.rowcount != 1:  # type: ignore[attr-defined]
                    continue
                subject = await self._describe(session, row.item_id)
                if subject is None:
                    continue
                kind = self._engine.kind
                for late in self._responsible(row.name, subject):
                    await self._rt.audit.record(
                        session,
                        caller=Caller(
                            organization_id=late,
                            organization_type=PLATFORM,
                            client_id=f"service:{self._rt.name}",
                        ),
                        type=f"{kind}.deadline-breach",
                        action=Action.ACTION_EXECUTE,
                        patient_enterprise_id=subject.enterprise_id,
                        entities=[(subject.resource_type, subject.item_id), ("Clock", row.name)],
                    )
                await self._engine.notify(
                    session,
                    event_type=f"{kind}.deadline-breach",
                    organization_ids=subject.parties,
                    resource_type=subject.resource_type,
                    resource_id=subject.item_id,
                    status=row.name,
                )
                fired += 1
        if fired:
            self._rt.outbox.notify()
        return fired

    def start(self) -> None:
        self._rt.background(self.run(), name=f"{self._engine.kind}-deadlines")
