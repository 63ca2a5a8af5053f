"""The gateway's tables: member organisations with their registered keys, and used assertion ids."""

from __future__ import annotations

import datetime
import json
import time
import uuid
from typing import Any

from sqlalchemy import MetaData, String, Text, bindparam, delete, select, text
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


# Built once: constructing the statement per call was a fifth of the check's cost.
_REMEMBER_POSTGRESQL = (
    postgresql_insert(UsedAssertion)
    .values(jti=bindparam("jti"), client_id=bindparam("client_id"), expires_at=bindparam("expires_at"))
    .on_conflict_do_nothing(index_elements=[UsedAssertion.jti])
    .returning(UsedAssertion.jti)
)


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

    On PostgreSQL each check is one statement on a small pool of the ledger's own, in autocommit
    with `synchronous_commit` off on its connections: one round trip instead of four (BEGIN, SET
    LOCAL, INSERT, COMMIT through a session). Measured with `hie bench load --only
    document_query` (issue 21): the session path was 15 % of the gateway's CPU per query (about
    0.9 ms on the contended 2-core machine). The durability trade is the one the session path
    made: a crash may forget the last jtis, reopening a replay window of at most one assertion
    lifetime for them. On SQLite, the session path as before."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], *, url: str, schema: str) -> None:
        self._sessions = sessions
        self._engine: AsyncEngine | None = None
        if url.startswith("postgresql"):
            self._engine = create_async_engine(
                url,
                hide_parameters=True,
                isolation_level="AUTOCOMMIT",
                # Kept, not churned: with 4 kept and 8 overflow, 16 concurrent API calls opened
                # and closed a connection per call beyond the fourth (a backend started and ended
                # in PostgreSQL each time; 5 % of the gateway's samples in issue 21's document
                # query bench). About as many connections at the peak, now reused.
                pool_size=12,
                max_overflow=4,
                connect_args={"server_settings": {"search_path": schema, "synchronous_commit": "off"}},
            )
            ping_when_idle(self._engine)
            trace_statements(self._engine, schema=schema)
        self._last_prune = 0.0

    async def remember(self, *, jti: str, client_id: str, expires_at: datetime.datetime) -> bool:
        """False if this client used this jti before (a replay)."""
        if self._engine is None:
            async with self._sessions() as session, session.begin():
                return await remember_user_assertion(session, jti=jti, client_id=client_id, expires_at=expires_at)
        async with self._engine.connect() as connection:
            now = time.monotonic()
            if now - self._last_prune > _PRUNE_EVERY_SECONDS:
                self._last_prune = now
                await connection.execute(delete(UsedAssertion).where(UsedAssertion.expires_at < utcnow()))
            row = await connection.execute(
                _REMEMBER_POSTGRESQL,
                {"jti": f"user:{client_id}:{jti}"[:256], "client_id": client_id[:64], "expires_at": expires_at},
            )
            return row.first() is not None

    async def close(self) -> None:
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
