"""The shape of every change a service makes: one transaction holding the change and what it
stages with it (audit events, outbox messages), committed, then the outbox relay woken.

The relay is woken after the commit, never before (woken early it finds nothing and sleeps until
its next poll), and not at all when the change fails (the rollback staged nothing)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

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
