"""The gateway's tables: member organisations with their registered keys, and used assertion ids."""

from __future__ import annotations

import asyncio
import datetime
import json
import time
import uuid
from typing import Any

from sqlalchemy import MetaData, String, Text, delete, select, text
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.shared.db import UtcDateTime, ping_when_idle, trace_statements, utcnow
from services.shared.outbox import outbox_table

metadata = MetaData()
ORGANIZATION_TYPES = ("hospital", "authority", "platform-admin")
# A hospital's level in the medical alliance (分级诊疗): a referral's direction follows from it.
ORGANIZATION_TIERS = ("community", "secondary", "tertiary")


class Base(DeclarativeBase):
    metadata = metadata


class Organization(Base):
    """A member institution and its OAuth2 client registration."""

    __tablename__ = "organization"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    type: Mapped[str] = mapped_column(String(16))
    client_id: Mapped[str] = mapped_column(String(64), unique=True)
    jwks: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="active")
    # community | secondary | tertiary, or "" when not set (hospitals only).
    tier: Mapped[str] = mapped_column(String(16), default="", server_default="")
    created_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime)

    @property
    def keys(self) -> list[dict[str, Any]]:
        return list(json.loads(self.jwks).get("keys", []))


# Token issuance and refusals are audited through the gateway's own transactional outbox.
outbox_table(metadata)


class UsedAssertion(Base):
    """RFC 7523 §3 (7): the jti of every accepted client assertion, until it expires."""

    __tablename__ = "used_assertion"

    jti: Mapped[str] = mapped_column(String(256), primary_key=True)
    client_id: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime, index=True)


async def add_organization(
    session: AsyncSession, *, org_id: str, name: str, type: str, jwks: dict[str, Any], tier: str = ""
) -> Organization:
    org = Organization(
        id=org_id,
        name=name,
        type=type,
        tier=tier,
        client_id=str(uuid.uuid4()),
        jwks=json.dumps(jwks, ensure_ascii=False),
        status="active",
        created_at=utcnow(),
    )
    session.add(org)
    await session.flush()
    return org


async def organization_by_client(session: AsyncSession, client_id: str) -> Organization | None:
    return await session.scalar(select(Organization).where(Organization.client_id == client_id))


async def list_organizations(session: AsyncSession) -> list[Organization]:
    return list(await session.scalars(select(Organization).order_by(Organization.id)))


async def remember_assertion(session: AsyncSession, *, jti: str, client_id: str, expires_at: datetime.datetime) -> bool:
    """False if the jti was seen before (a replay)."""
    await session.execute(delete(UsedAssertion).where(UsedAssertion.expires_at < utcnow()))
    try:
        async with session.begin_nested():
            session.add(UsedAssertion(jti=jti, client_id=client_id, expires_at=expires_at))
            await session.flush()
    except IntegrityError:
        return False
    return True


_PRUNE_EVERY_SECONDS = 30.0
_last_prune = 0.0


# The ledger's statement for a batch of user assertion jtis (`UserAssertionLedger`): one row
# per (jti, client, expiry) of the arrays, those already there skipped, the new ones returned.
_REMEMBER_MANY = text(
    "INSERT INTO used_assertion (jti, client_id, expires_at) "
    "SELECT * FROM unnest(CAST(:jtis AS varchar[]), CAST(:client_ids AS varchar[]), CAST(:expires AS timestamptz[])) "
    "ON CONFLICT (jti) DO NOTHING RETURNING jti"
)
# Statements on their way at once, and jtis in one statement.
_BATCHES_IN_FLIGHT = 1
_BATCH_SIZE = 256


async def remember_user_assertion(
    session: AsyncSession, *, jti: str, client_id: str, expires_at: datetime.datetime
) -> bool:
    """False if this client used this user assertion jti before (a replay). Kept in the same table
    as client assertion jtis, in the client's own namespace; expired ones are pruned now and then
    rather than on every request (this runs on every API call)."""
    global _last_prune
    if session.bind is not None and session.bind.dialect.name == "postgresql":
        # No wait for the WAL flush: a crash may forget the last jtis, reopening a replay window of
        # at most one assertion lifetime (five minutes) for them; every request pays otherwise.
        await session.execute(text("SET LOCAL synchronous_commit TO OFF"))
    now = time.monotonic()
    if now - _last_prune > _PRUNE_EVERY_SECONDS:
        _last_prune = now
        await session.execute(delete(UsedAssertion).where(UsedAssertion.expires_at < utcnow()))
    key = f"user:{client_id}:{jti}"[:256]
    # One statement, no savepoint: a jti already there inserts nothing and returns no row.
    insert = (
        postgresql_insert if session.bind is not None and session.bind.dialect.name == "postgresql" else sqlite_insert
    )
    statement = (
        insert(UsedAssertion)
        .values(jti=key, client_id=client_id[:64], expires_at=expires_at)
        .on_conflict_do_nothing(index_elements=[UsedAssertion.jti])
        .returning(UsedAssertion.jti)
    )
    return (await session.execute(statement)).first() is not None


class UserAssertionLedger:
    """The used user assertion jtis, checked once per API call (`remember_user_assertion`'s rule).

    On PostgreSQL the checks of the requests waiting at the same moment are one statement (an
    `INSERT … SELECT unnest(…) ON CONFLICT DO NOTHING RETURNING jti`) on a small pool of the
    ledger's own, in autocommit with `synchronous_commit` off: a request whose jti the statement
    returns is the first use, any other is a replay. The batch forms by itself: while a statement
    is on its way, the requests arriving meanwhile wait for the next one (at most
    `_BATCHES_IN_FLIGHT` at a time), so an idle gateway still answers with one round trip and a
    busy one pays one statement for many requests. Replicas stay correct: the database's primary
    key decides, not memory (two requests with one jti in the same batch: the first wins).
    Measured with `hie bench load --only document_query` (issue 21): a statement per request
    through SQLAlchemy was about 15 % of the gateway's samples. The durability trade is the one
    the session path made: a crash may forget the last jtis, reopening a replay window of at most
    one assertion lifetime for them. On SQLite, the session path as before."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], *, url: str, schema: str) -> None:
        self._sessions = sessions
        self._engine: AsyncEngine | None = None
        if url.startswith("postgresql"):
            self._engine = create_async_engine(
                url,
                hide_parameters=True,
                isolation_level="AUTOCOMMIT",
                # `_BATCHES_IN_FLIGHT` statements at a time; the prune runs on the same connection.
                pool_size=_BATCHES_IN_FLIGHT,
                max_overflow=2,
                connect_args={"server_settings": {"search_path": schema, "synchronous_commit": "off"}},
            )
            ping_when_idle(self._engine)
            trace_statements(self._engine, schema=schema)
        self._last_prune = 0.0
        self._waiting: list[tuple[str, str, datetime.datetime, asyncio.Future[bool]]] = []
        self._in_flight = 0
        self._batches: set[asyncio.Task[None]] = set()

    async def remember(self, *, jti: str, client_id: str, expires_at: datetime.datetime) -> bool:
        """False if this client used this jti before (a replay)."""
        if self._engine is None:
            async with self._sessions() as session, session.begin():
                return await remember_user_assertion(session, jti=jti, client_id=client_id, expires_at=expires_at)
        fresh: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.append((f"user:{client_id}:{jti}"[:256], client_id[:64], expires_at, fresh))
        self._start_batch()
        return await fresh

    def _start_batch(self) -> None:
        if not self._waiting or self._in_flight >= _BATCHES_IN_FLIGHT:
            return
        batch, self._waiting = self._waiting[:_BATCH_SIZE], self._waiting[_BATCH_SIZE:]
        self._in_flight += 1
        # The statement's span lands in the trace of the request that started the batch.
        task = asyncio.get_running_loop().create_task(self._insert(batch))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _insert(self, batch: list[tuple[str, str, datetime.datetime, asyncio.Future[bool]]]) -> None:
        assert self._engine is not None
        try:
            # A jti twice in one batch: the first is the use, the others replays (the statement
            # would return it once, for both).
            first: dict[str, tuple[str, datetime.datetime]] = {}
            for key, client_id, expires_at, _ in batch:
                first.setdefault(key, (client_id, expires_at))
            async with self._engine.connect() as connection:
                now = time.monotonic()
                if now - self._last_prune > _PRUNE_EVERY_SECONDS:
                    self._last_prune = now
                    await connection.execute(delete(UsedAssertion).where(UsedAssertion.expires_at < utcnow()))
                rows = await connection.execute(
                    _REMEMBER_MANY,
                    {
                        "jtis": list(first),
                        "client_ids": [client_id for client_id, _ in first.values()],
                        "expires": [expires_at for _, expires_at in first.values()],
                    },
                )
                inserted = set(rows.scalars())
        except Exception as exc:
            # Each waiting request fails as its own statement would have (a storage fault: 503).
            for *_, fresh in batch:
                if not fresh.done():
                    fresh.set_exception(exc)
            return
        except BaseException:
            for *_, fresh in batch:
                fresh.cancel()
            raise
        finally:
            self._in_flight -= 1
            self._start_batch()
        for key, _, _, fresh in batch:
            if not fresh.done():
                fresh.set_result(key in inserted)
            inserted.discard(key)

    async def close(self) -> None:
        if self._batches:
            await asyncio.gather(*self._batches, return_exceptions=True)
        if self._engine is not None:
            await self._engine.dispose()


async def organization(session: AsyncSession, org_id: str) -> Organization | None:
    return await session.get(Organization, org_id)


async def add_keys(session: AsyncSession, org: Organization, jwks: dict[str, Any]) -> list[str]:
    """Register more public keys (rotation: the new key works before the old one is removed)."""
    keys = {k["kid"]: k for k in org.keys}
    for key in jwks["keys"]:
        keys[key["kid"]] = key
    org.jwks = json.dumps({"keys": list(keys.values())}, ensure_ascii=False)
    return list(keys)


async def remove_key(session: AsyncSession, org: Organization, kid: str) -> list[str]:
    keys = [k for k in org.keys if k["kid"] != kid]
    if len(keys) == len(org.keys):
        raise LookupError("no such key")
    if not keys:
        raise ValueError("an organisation keeps at least one key; revoke it instead")
    org.jwks = json.dumps({"keys": keys}, ensure_ascii=False)
    return [k["kid"] for k in keys]


async def tiers(session: AsyncSession, org_ids: list[str]) -> dict[str, str]:
    """The tier of each named organisation that has one."""
    rows = await session.execute(
        select(Organization.id, Organization.tier).where(Organization.id.in_(org_ids), Organization.tier != "")
    )
    return {org_id: tier for org_id, tier in rows.all()}
