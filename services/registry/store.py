"""The registry's tables (entries) and the repository's (content), and their queries."""

from __future__ import annotations

import datetime
from collections.abc import Sequence

from sqlalchemy import (
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    select,
    tuple_,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.shared.db import UtcDateTime
from services.shared.outbox import outbox_table

metadata = MetaData()


class Base(DeclarativeBase):
    metadata = metadata


class DocumentEntryRecord(Base):
    __tablename__ = "document_entry"
    __table_args__ = (
        UniqueConstraint("source_organization_id", "source_document_id", name="uq_entry_source_document"),
        Index("ix_entry_patient", "patient_domain", "patient_local_id", "created"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    source_document_id: Mapped[str] = mapped_column(String(128))
    source_organization_id: Mapped[str] = mapped_column(String(64))
    patient_domain: Mapped[str] = mapped_column(String(64))
    patient_local_id: Mapped[str] = mapped_column(String(64))
    enterprise_id: Mapped[str] = mapped_column(String(36))
    author_id: Mapped[str] = mapped_column(String(64), default="")
    author_name: Mapped[str] = mapped_column(String(64), default="")
    author_role: Mapped[str] = mapped_column(String(32), default="")
    author_department: Mapped[str] = mapped_column(String(64), default="")
    class_system: Mapped[str] = mapped_column(String(128), default="")
    class_code: Mapped[str] = mapped_column(String(64), default="")
    class_display: Mapped[str] = mapped_column(String(128), default="")
    type_system: Mapped[str] = mapped_column(String(128), default="")
    type_code: Mapped[str] = mapped_column(String(64))
    type_display: Mapped[str] = mapped_column(String(128), default="")
    confidentiality: Mapped[str] = mapped_column(String(1))
    security_labels: Mapped[str] = mapped_column(Text, default="")
    title: Mapped[str] = mapped_column(String(256))
    language: Mapped[str] = mapped_column(String(16), default="zh-CN")
    mime_type: Mapped[str] = mapped_column(String(100))
    size: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    status: Mapped[int] = mapped_column(Integer)
    created: Mapped[datetime.datetime] = mapped_column(UtcDateTime)
    service_start: Mapped[datetime.datetime | None] = mapped_column(UtcDateTime, nullable=True)
    service_end: Mapped[datetime.datetime | None] = mapped_column(UtcDateTime, nullable=True)
    registered_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime)
    idempotency_key: Mapped[str] = mapped_column(String(128), default="")

    @property
    def labels(self) -> list[str]:
        return [label for label in self.security_labels.split(" ") if label]


class DocumentContent(Base):
    """The repository: content bytes by document id."""

    __tablename__ = "document_content"

    document_id: Mapped[str] = mapped_column(ForeignKey("document_entry.id", ondelete="CASCADE"), primary_key=True)
    content: Mapped[bytes] = mapped_column(LargeBinary)


outbox_table(metadata)


async def find_by_source_id(
    session: AsyncSession, *, source_organization_id: str, source_document_id: str
) -> DocumentEntryRecord | None:
    return await session.scalar(
        select(DocumentEntryRecord).where(
            DocumentEntryRecord.source_organization_id == source_organization_id,
            DocumentEntryRecord.source_document_id == source_document_id,
        )
    )


async def entries_of_patient(
    session: AsyncSession,
    *,
    refs: Sequence[tuple[str, str]],
    type_codes: Sequence[str],
    statuses: Sequence[int],
    offset: int,
    limit: int,
) -> list[DocumentEntryRecord]:
    stmt = select(DocumentEntryRecord).where(
        tuple_(DocumentEntryRecord.patient_domain, DocumentEntryRecord.patient_local_id).in_(list(refs))
    )
    if type_codes:
        stmt = stmt.where(DocumentEntryRecord.type_code.in_(list(type_codes)))
    if statuses:
        stmt = stmt.where(DocumentEntryRecord.status.in_(list(statuses)))
    stmt = stmt.order_by(DocumentEntryRecord.created.desc(), DocumentEntryRecord.id).offset(offset).limit(limit)
    return list(await session.scalars(stmt))


async def content_of(session: AsyncSession, document_id: str) -> bytes | None:
    return await session.scalar(select(DocumentContent.content).where(DocumentContent.document_id == document_id))
