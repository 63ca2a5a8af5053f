"""Whether a client's organisation is still in good standing, checked on every request.

Revoking an organisation stops new tokens at once (the token endpoint reads the database)
and stops requests with already issued tokens at the gateway within `ttl_seconds`; services
behind the gateway accept a revoked client's token until it expires (at most five minutes).
"""

from __future__ import annotations

import asyncio
import time

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway import store


class OrganizationStanding:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], *, ttl_seconds: float = 5.0) -> None:
        self._sessions = sessions
        self._ttl = ttl_seconds
        self._cache: dict[str, tuple[float, bool]] = {}
        self._lookups: dict[str, asyncio.Task[bool]] = {}

    async def is_active(self, client_id: str) -> bool:
        cached = self._cache.get(client_id)
        if cached and time.monotonic() - cached[0] < self._ttl:
            return cached[1]
        # One lookup per client at a time: when the entry expires, the client's requests in
        # flight (16 under `hie bench load`) wait for the same query instead of each sending one.
        lookup = self._lookups.get(client_id)
        if self._ttl <= 0:
            # Asked for every request (tests): each sees the database as of its own arrival.
            return await self._look_up(client_id)
        if lookup is None:
            lookup = asyncio.ensure_future(self._look_up(client_id))
            self._lookups[client_id] = lookup
            lookup.add_done_callback(lambda _: self._lookups.pop(client_id, None))
        # Shielded: a request that goes away does not cancel the others' answer.
        return await asyncio.shield(lookup)

    async def _look_up(self, client_id: str) -> bool:
        now = time.monotonic()
        async with self._sessions() as session:
            org = await store.organization_by_client(session, client_id)
        active = org is not None and org.status == "active"
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[client_id] = (now, active)
        return active
