"""Each replica's cached view of patients' consent records, checked on every request against the
patient's version counter in the database.

Every change to a patient's directives, grants or break-the-glass bumps that counter in the same
transaction (`store.bump_version`), so a request that starts after the change commits reads the
new version, misses the cache and loads the new records: a revocation takes effect on the next
request on every replica, and no stale permit survives it. The cost is one primary-key read per
decision batch, instead of three range reads. Times (periods, expiries) are evaluated per
request, never cached.
"""

from __future__ import annotations

from collections import OrderedDict

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from services.consent import store
from services.consent.policy import PatientConsent

_EMPTY = PatientConsent()


class PatientConsentCache:
    def __init__(self, engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession], *, size: int = 10_000) -> None:
        self._engine = engine
        self._sessions = sessions
        self._size = size
        self._entries: OrderedDict[str, tuple[int, PatientConsent]] = OrderedDict()
        self.loads = 0

    async def get(self, enterprise_id: str) -> PatientConsent:
        """The patient's records as of this request."""
        # The version is read before the records: records loaded after it are at least as new
        # as it says, so a change committed in between only causes one more reload.
        async with self._engine.connect() as connection:
            version = await store.version_of(connection, enterprise_id)
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
