"""The shape of every change a service makes: one transaction holding the change and what it
stages with it (audit events, outbox messages), committed, then the outbox relay woken.

The relay is woken after the commit, never before (woken early it finds nothing and sleeps until
its next poll), and not at all when the change fails (the rollback staged nothing)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from hie.audit.v1 import audit_pb2
from services.shared.auth import Caller
from services.shared.process import ServiceRuntime

T = TypeVar("T")


@contextlib.asynccontextmanager
async def change(runtime: ServiceRuntime, *, lock: asyncio.Lock | None = None) -> AsyncIterator[AsyncSession]:
    """A session in a transaction, committed when the block ends, then the outbox relay woken.
    `lock` serialises the service's writers (SQLite has one writer)."""
    async with lock or contextlib.nullcontext(), runtime.sessions() as session, session.begin():
        yield session
    runtime.outbox.notify()


async def run(
    runtime: ServiceRuntime, operation: Callable[[AsyncSession], Awaitable[T]], *, lock: asyncio.Lock | None = None
) -> T:
    """`operation(session)` as one change (see `change`); returns its result."""
    async with change(runtime, lock=lock) as session:
        return await operation(session)


async def audited(
    runtime: ServiceRuntime,
    *,
    caller: Caller,
    type: str,
    action: audit_pb2.Action.ValueType,
    outcome: audit_pb2.Outcome.ValueType = audit_pb2.OUTCOME_SUCCESS,
    patient_enterprise_id: str = "",
    entities: Iterable[tuple[str, str]] = (),
) -> str:
    """One audit event in a transaction of its own (the audit of a read, which changes nothing
    else), the relay woken; returns the event id."""
    async with change(runtime) as session:
        return await runtime.audit.record(
            session,
            caller=caller,
            type=type,
            action=action,
            outcome=outcome,
            patient_enterprise_id=patient_enterprise_id,
            entities=entities,
        )
