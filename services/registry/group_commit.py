"""Group commit: concurrent registrations share one database transaction, each inside its own
savepoint, and all of them answer only once that transaction has committed.

Under load most of a small registration's cost is not its statements but the transaction around
them: a connection checkout with its liveness ping, BEGIN, COMMIT and its WAL flush. Here the
first registration opens a group (a session and transaction); registrations arriving while it is
busy queue on it and run one after another on its connection, each in a SAVEPOINT; the group
commits as soon as nobody is queued (so a lone registration commits at once, with no added
wait) or when it holds `max_members`. Arrivals after that open the next group.

Atomicity is kept per submission: a member that fails rolls back to its savepoint and leaves
the others untouched; if the commit itself fails, every member gets the error and nothing of the
group is stored (a retry with the same document id is answered as usual).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

_T = TypeVar("_T")


class _Group:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        self.lock = asyncio.Lock()
        self.queued = 0
        self.members = 0
        self.closed = False
        self.committed: asyncio.Future[None] = asyncio.get_running_loop().create_future()


class GroupCommit:
    """Runs bodies in savepoints of shared transactions (see the module docstring)."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], *, max_members: int = 64) -> None:
        self._sessions = sessions
        self._max = max_members
        self._open: _Group | None = None

    async def run(self, body: Callable[[AsyncSession], Awaitable[_T]]) -> _T:
        """`body`'s result once its statements are committed; its exception (nothing of it
        stored) otherwise. The body must not wait on anything but the database: the group's
        connection is its alone while it runs."""
        group = self._open
        if group is None or group.closed or group.members >= self._max:
            group = self._open = _Group(self._sessions())
        group.members += 1
        group.queued += 1
        acquired = False
        try:
            async with group.lock:
                acquired = True
                group.queued -= 1
                try:
                    async with group.session.begin_nested():
                        result = await body(group.session)
                finally:
                    if group.queued == 0 and not group.closed:
                        # Nobody waiting behind: commit now (the caller's own commit when alone).
                        await self._commit_shielded(group)
        finally:
            if not acquired:
                # Cancelled while queued: if it was the last one queued and the lock is free, the
                # group would wait for nobody; commit what the others wrote.
                group.queued -= 1
                if group.queued == 0 and not group.closed and not group.lock.locked():
                    await self._commit_shielded(group)
        await asyncio.shield(group.committed)
        return result

    async def _commit_shielded(self, group: _Group) -> None:
        """The commit runs to its end even if the member that started it is cancelled."""
        group.closed = True
        if self._open is group:
            self._open = None
        await asyncio.shield(asyncio.ensure_future(self._commit(group)))

    async def _commit(self, group: _Group) -> None:
        try:
            await group.session.commit()
        except Exception as exc:
            group.committed.set_exception(exc)
            # Every member sees the failure; nobody need retrieve it from the future as well.
            group.committed.exception()
            with contextlib.suppress(Exception):
                await group.session.rollback()
        else:
            group.committed.set_result(None)
        finally:
            with contextlib.suppress(Exception):
                await group.session.close()
