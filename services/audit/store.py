"""The audit log's table and queries."""

from __future__ import annotations

import datetime
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import BigInteger, Index, Integer, MetaData, Select, String, Text, cast, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.audit import chain
from services.shared.db import UtcDateTime
from services.shared.outbox import outbox_table

metadata = MetaData()
# Any constant: the advisory lock that serialises appends to the one chain on PostgreSQL.
_CHAIN_LOCK = 0x4A1D17
_SUCCESS = 1  # audit_pb2.OUTCOME_SUCCESS


class Base(DeclarativeBase):
    metadata = metadata


class AuditRecord(Base):
    __tablename__ = "audit_record"
    __table_args__ = (
        Index("ix_audit_trace_id", "trace_id"),
        Index("ix_audit_patient", "patient_enterprise_id", "occurred"),
        Index("ix_audit_org", "organization_id", "occurred"),
        Index("ix_audit_occurred", "occurred"),
    )

    sequence: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(36), unique=True)
    occurred: Mapped[datetime.datetime] = mapped_column(UtcDateTime)
    recorded: Mapped[datetime.datetime] = mapped_column(UtcDateTime)
    type: Mapped[str] = mapped_column(String(64))
    action: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[int] = mapped_column(Integer)
    organization_id: Mapped[str] = mapped_column(String(64))
    organization_type: Mapped[str] = mapped_column(String(16))
    client_id: Mapped[str] = mapped_column(String(128))
    practitioner_id: Mapped[str] = mapped_column(String(64))
    practitioner_name: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(32))
    department: Mapped[str] = mapped_column(String(64))
    purpose_of_use: Mapped[str] = mapped_column(String(32))
    patient_enterprise_id: Mapped[str] = mapped_column(String(36))
    entities: Mapped[str] = mapped_column(Text)
    source_address: Mapped[str] = mapped_column(String(64))
    trace_id: Mapped[str] = mapped_column(String(32))
    span_id: Mapped[str] = mapped_column(String(16))
    source_service: Mapped[str] = mapped_column(String(32))
    previous_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))

    def as_mapping(self) -> dict[str, Any]:
        return {c.key: getattr(self, c.key) for c in self.__table__.columns}


outbox_table(metadata)


async def lock_chain(session: AsyncSession) -> None:
    if session.bind.dialect.name == "postgresql":
        # Keyed by the schema too: advisory locks are database-wide, and each exchange (schema
        # prefix) in a database has its own chain.
        await session.execute(text("SELECT pg_advisory_xact_lock(hashtext(current_schema()), :k)"), {"k": _CHAIN_LOCK})


async def chain_head(session: AsyncSession) -> tuple[int, str]:
    row = (
        await session.execute(
            select(AuditRecord.sequence, AuditRecord.hash).order_by(AuditRecord.sequence.desc()).limit(1)
        )
    ).first()
    return (row.sequence, row.hash) if row else (0, chain.GENESIS_HASH)


async def existing_event_ids(session: AsyncSession, event_ids: Sequence[str]) -> set[str]:
    rows = await session.scalars(select(AuditRecord.event_id).where(AuditRecord.event_id.in_(event_ids)))
    return set(rows)


async def append(session: AsyncSession, fields: dict[str, Any], previous: tuple[int, str]) -> AuditRecord:
    """Add one record after `previous` (sequence, hash); the caller holds the chain lock."""
    sequence, previous_hash = previous
    fields = {**fields, "sequence": sequence + 1, "previous_hash": previous_hash}
    fields["hash"] = chain.link_hash(previous_hash, fields)
    record = AuditRecord(**fields)
    session.add(record)
    return record


@dataclass(frozen=True)
class AuditSearch:
    """What an auditor searches by; empty fields do not filter."""

    trace_id: str = ""
    organization_id: str = ""
    patient_enterprise_id: str = ""
    type: str = ""
    practitioner_id: str = ""
    purpose_of_use: str = ""
    outcome: int = 0
    failures_only: bool = False
    since: datetime.datetime | None = None
    until: datetime.datetime | None = None

    def where(self, stmt: Select[Any]) -> Select[Any]:
        t = AuditRecord
        for column, value in (
            (t.trace_id, self.trace_id),
            (t.organization_id, self.organization_id),
            (t.patient_enterprise_id, self.patient_enterprise_id),
            (t.type, self.type),
            (t.practitioner_id, self.practitioner_id),
            (t.purpose_of_use, self.purpose_of_use),
            (t.outcome, self.outcome),
        ):
            if value:
                stmt = stmt.where(column == value)
        if self.failures_only:
            stmt = stmt.where(t.outcome != _SUCCESS)
        if self.since:
            stmt = stmt.where(t.occurred >= self.since)
        if self.until:
            stmt = stmt.where(t.occurred < self.until)
        return stmt


async def query(
    session: AsyncSession, search: AuditSearch, *, after_sequence: int = 0, limit: int = 100
) -> list[AuditRecord]:
    stmt = search.where(select(AuditRecord).where(AuditRecord.sequence > after_sequence))
    return list(await session.scalars(stmt.order_by(AuditRecord.sequence).limit(limit)))


async def volumes(session: AsyncSession, search: AuditSearch) -> list[tuple[str, str, str, int, int]]:
    """(day, organisation, type, outcome, count), days in UTC."""
    occurred = AuditRecord.occurred
    day = (
        func.to_char(func.timezone("UTC", occurred), "YYYY-MM-DD")
        if session.bind.dialect.name == "postgresql"
        else func.substr(cast(occurred, String), 1, 10)
    )
    stmt = search.where(
        select(day.label("day"), AuditRecord.organization_id, AuditRecord.type, AuditRecord.outcome, func.count())
    ).group_by(day, AuditRecord.organization_id, AuditRecord.type, AuditRecord.outcome)
    rows = await session.execute(stmt.order_by(day, AuditRecord.organization_id, AuditRecord.type))
    return [(str(r[0]), r[1], r[2], r[3], int(r[4])) for r in rows]


class Checkpoint(Base):
    """A signed statement of the chain head at a moment: removing records from the end of the
    chain leaves a checkpoint (here, and wherever an auditor kept a copy) pointing past it."""

    __tablename__ = "audit_checkpoint"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    sequence: Mapped[int] = mapped_column(BigInteger, index=True)
    hash: Mapped[str] = mapped_column(String(64))
    signed_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime)
    jws: Mapped[str] = mapped_column(Text)
    # SM2 co-signature over the JWS under the national-algorithms option (hex DER), else NULL.
    sm2_signature: Mapped[str | None] = mapped_column(Text, nullable=True)


async def sequence_range(
    session: AsyncSession, since: datetime.datetime | None, until: datetime.datetime | None
) -> tuple[int, int, str] | None:
    """(first, last, hash before first) of the records that occurred in [since, until)."""
    bounds = select(func.min(AuditRecord.sequence), func.max(AuditRecord.sequence))
    if since:
        bounds = bounds.where(AuditRecord.occurred >= since)
    if until:
        bounds = bounds.where(AuditRecord.occurred < until)
    first, last = (await session.execute(bounds)).one()
    if first is None:
        return None
    previous = await session.scalar(select(AuditRecord.hash).where(AuditRecord.sequence == first - 1))
    return int(first), int(last), previous or chain.GENESIS_HASH


async def latest_checkpoint(session: AsyncSession) -> Checkpoint | None:
    return await session.scalar(select(Checkpoint).order_by(Checkpoint.id.desc()).limit(1))


async def all_checkpoints(session: AsyncSession) -> list[Checkpoint]:
    return list(await session.scalars(select(Checkpoint).order_by(Checkpoint.id)))


async def all_records(
    session: AsyncSession, *, batch: int = 20_000, after_sequence: int = 0
) -> AsyncIterator[chain.StoredRecord]:
    """Every record in sequence order, for verification: read by keyset in batches, so memory
    stays constant, as `chain.StoredRecord` tuples (the columns chain.STORED_FIELDS names).

    On SQLite and PostgreSQL the rows are read through the driver connection, without the ORM's
    per-row processing, and each becomes a StoredRecord only as it is handed out (so it is freed
    as soon as it is checked): a million records have to verify in seconds. The values are those
    the typed columns would give (`_stored_record_sqlite` reproduces UtcDateTime on SQLite)."""
    connection = await session.connection()
    dialect = connection.dialect.name
    if dialect in {"sqlite", "postgresql"}:
        driver = (await connection.get_raw_connection()).driver_connection
        read, stored = (
            (_read_sqlite(driver), _stored_record_sqlite)
            if dialect == "sqlite"
            else (_read_postgresql(driver), chain.StoredRecord)
        )
    else:
        read, stored = _read_typed(session), chain.StoredRecord
    after = after_sequence
    while True:
        rows = await read(after, batch)
        if not rows:
            return
        for row in rows:
            yield stored(row)
        after = rows[-1][_SEQUENCE]


_COLUMNS = ", ".join(chain.STORED_FIELDS)
_SEQUENCE = chain.STORED_FIELDS.index("sequence")
_OCCURRED = chain.STORED_FIELDS.index("occurred")
_RECORDED = chain.STORED_FIELDS.index("recorded")
# Reads up to `limit` rows (tuples of chain.STORED_FIELDS) after a sequence number.
_Reader = Callable[[int, int], Awaitable[Sequence[Sequence[Any]]]]


def _read_postgresql(driver: Any) -> _Reader:
    """asyncpg decodes every column as the typed columns would (timestamptz as an aware UTC
    datetime, which UtcDateTime returns unchanged)."""
    sql = f"SELECT {_COLUMNS} FROM audit_record WHERE sequence > $1 ORDER BY sequence LIMIT $2"  # noqa: S608

    async def read(after: int, limit: int) -> Sequence[Sequence[Any]]:
        return await driver.fetch(sql, after, limit)  # type: ignore[no-any-return]

    return read


def _read_sqlite(driver: Any) -> _Reader:
    sql = f"SELECT {_COLUMNS} FROM audit_record WHERE sequence > ? ORDER BY sequence LIMIT ?"  # noqa: S608

    async def read(after: int, limit: int) -> Sequence[Sequence[Any]]:
        async with driver.execute(sql, (after, limit)) as cursor:
            return await cursor.fetchall()  # type: ignore[no-any-return]

    return read


def _stored_record_sqlite(row: Sequence[Any]) -> chain.StoredRecord:
    """SQLite keeps times as text. The typed column reads one with datetime.fromisoformat
    (SQLAlchemy's SQLite DATETIME) and UtcDateTime puts a naive result in UTC; canonical()
    writes that datetime's isoformat(), which for UTC is the naive one plus "+00:00". Each time
    becomes that text here (NULL stays None)."""
    values = list(row)
    occurred = values[_OCCURRED]
    if occurred is not None:
        occurred = _fromisoformat(occurred)
        values[_OCCURRED] = occurred.isoformat() + "+00:00" if occurred.tzinfo is None else occurred.isoformat()
    recorded = values[_RECORDED]
    if recorded is not None:
        recorded = _fromisoformat(recorded)
        values[_RECORDED] = recorded.isoformat() + "+00:00" if recorded.tzinfo is None else recorded.isoformat()
    return chain.StoredRecord(values)


_fromisoformat = datetime.datetime.fromisoformat


def _read_typed(session: AsyncSession) -> _Reader:
    """Any other database: through the typed columns."""
    table = AuditRecord.__table__
    columns = [table.c[name] for name in chain.STORED_FIELDS]

    async def read(after: int, limit: int) -> Sequence[Sequence[Any]]:
        stmt = select(*columns).where(table.c.sequence > after).order_by(table.c.sequence).limit(limit)
        return (await session.execute(stmt)).all()

    return read


def entities_json(entities: Sequence[tuple[str, str]]) -> str:
    return json.dumps([{"type": t, "id": i} for t, i in entities], ensure_ascii=False, separators=(",", ":"))
