"""Each replica's cached view of patients' consent records, checked on every request against the
patient's version counter in the database.

Every change to a patient's directives, grants or break-the-glass bumps that counter in the same
transaction (`store.bump_version`), so a request that starts after the change commits reads the
new version, misses the cache and loads the new records: a revocation takes effect on the next
request on every replica, and no stale permit survives it. The cost is one primary-key read per
decision batch, instead of three range reads. Times (periods, expiries) are evaluated per
request, never cached.

The version is read on one connection the cache holds in autocommit mode (each read sees every
commit before it, and no snapshot is kept between reads), which halves the read's cost against a
pool checkout with its liveness ping; a request that finds it busy, or finds it broken, reads
through an ordinary checkout instead.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker

from services.consent import store
from services.consent.policy import PatientConsent

_EMPTY = PatientConsent()


class PatientConsentCache:
    def __init__(self, engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession], *, size: int = 10_000) -> None:
        self._engine = engine
        self._sessions = sessions
        self._size = size
        self._entries: OrderedDict[str, tuple[int, PatientConsent]] = OrderedDict()
        self._held: AsyncConnection | None = None
        self._held_lock = asyncio.Lock()
        self.loads = 0

    async def _version(self, enterprise_id: str) -> int:
        if not self._held_lock.locked():
            async with self._held_lock:
                try:
                    if self._held is None:
                        connection = await self._engine.connect()
                        self._held = await connection.execution_options(isolation_level="AUTOCOMMIT")
                    return await store.version_of(self._held, enterprise_id)
                except DBAPIError:
                    await self.close()  # a broken connection: drop it, read through the pool below
        async with self._engine.connect() as connection:
            return await store.version_of(connection, enterprise_id)

    async def close(self) -> None:
        """Return the held connection (before the engine is disposed)."""
        held, self._held = self._held, None
        if held is not None:
            with contextlib.suppress(DBAPIError):
                await held.close()

    async def get(self, enterprise_id: str) -> PatientConsent:
        """The patient's records as of this request."""
        # The version is read before the records: records loaded after it are at least as new
        # as it says, so a change committed in between only causes one more reload.
        version = await self._version(enterprise_id)
        if version == 0:
            return _EMPTY
        cached = self._entries.get(enterprise_id)
        if cached is not None and cached[0] == version:
            self._entries.move_to_end(enterprise_id)
            return cached[1]
        async with self._sessions() as session:
            consent = await store.load_patient(session, enterprise_id)
        self.loads += 1
        self._entries[enterprise_id] = (version, consent)
        self._entries.move_to_end(enterprise_id)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return consent
