"""The audit log's table and queries."""

from __future__ import annotations

import datetime
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

from sqlalchemy import BigInteger, Index, Integer, MetaData, String, Text, select, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.audit import chain
from services.shared.db import UtcDateTime
from services.shared.outbox import outbox_table

metadata = MetaData()
# Any constant: the advisory lock that serialises appends to the one chain on PostgreSQL.
_CHAIN_LOCK = 0x4A1D17


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
        await session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _CHAIN_LOCK})


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


async def query(
    session: AsyncSession,
    *,
    trace_id: str = "",
    organization_id: str = "",
    patient_enterprise_id: str = "",
    type: str = "",
    since: datetime.datetime | None = None,
    until: datetime.datetime | None = None,
    after_sequence: int = 0,
    limit: int = 100,
) -> list[AuditRecord]:
    stmt = select(AuditRecord).where(AuditRecord.sequence > after_sequence)
    if trace_id:
        stmt = stmt.where(AuditRecord.trace_id == trace_id)
    if organization_id:
        stmt = stmt.where(AuditRecord.organization_id == organization_id)
    if patient_enterprise_id:
        stmt = stmt.where(AuditRecord.patient_enterprise_id == patient_enterprise_id)
    if type:
        stmt = stmt.where(AuditRecord.type == type)
    if since:
        stmt = stmt.where(AuditRecord.occurred >= since)
    if until:
        stmt = stmt.where(AuditRecord.occurred < until)
    return list(await session.scalars(stmt.order_by(AuditRecord.sequence).limit(limit)))


async def all_records(session: AsyncSession, *, batch: int = 5000) -> AsyncIterator[dict[str, Any]]:
    """Every record in sequence order, streamed in batches (for verification)."""
    after = 0
    while True:
        rows = list(
            await session.scalars(
                select(AuditRecord).where(AuditRecord.sequence > after).order_by(AuditRecord.sequence).limit(batch)
            )
        )
        if not rows:
            return
        for row in rows:
            yield row.as_mapping()
        after = rows[-1].sequence
        session.expunge_all()


def entities_json(entities: Sequence[tuple[str, str]]) -> str:
    return json.dumps([{"type": t, "id": i} for t, i in entities], ensure_ascii=False, separators=(",", ":"))
