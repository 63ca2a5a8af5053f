"""The mpi's tables and queries."""

from __future__ import annotations

import datetime
import json
import uuid
import zlib

from sqlalchemy import Date, ForeignKey, Index, MetaData, String, Text, UniqueConstraint, select, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, selectinload

from services.mpi.domain import Candidate, EnterpriseId, Gender, Identifier, LinkDecision, Registration
from services.shared.db import UtcDateTime, utcnow
from services.shared.outbox import outbox_table

metadata = MetaData()


class Base(DeclarativeBase):
    metadata = metadata


class PatientRecord(Base):
    """A patient as one hospital domain registered them."""

    __tablename__ = "patient"
    __table_args__ = (
        UniqueConstraint("domain", "local_id", name="uq_patient_domain_local_id"),
        Index("ix_patient_enterprise_id", "enterprise_id"),
        Index("ix_patient_national_id", "national_id"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    domain: Mapped[str] = mapped_column(String(64))
    local_id: Mapped[str] = mapped_column(String(64))
    enterprise_id: Mapped[str] = mapped_column(String(36))
    name_text: Mapped[str] = mapped_column(String(64))
    family: Mapped[str] = mapped_column(String(64), default="")
    given: Mapped[str] = mapped_column(String(64), default="")
    gender: Mapped[str] = mapped_column(String(8))
    birth_date: Mapped[datetime.date | None] = mapped_column(Date, nullable=True)
    national_id: Mapped[str | None] = mapped_column(String(18), nullable=True)
    phones: Mapped[str] = mapped_column(Text, default="[]")
    province: Mapped[str] = mapped_column(String(32), default="")
    city: Mapped[str] = mapped_column(String(32), default="")
    district: Mapped[str] = mapped_column(String(32), default="")
    address_line: Mapped[str] = mapped_column(String(200), default="")
    postal_code: Mapped[str] = mapped_column(String(12), default="")
    link_method: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime)
    identifiers: Mapped[list[IdentifierRecord]] = relationship(
        back_populates="patient", cascade="all, delete-orphan", lazy="raise"
    )


class IdentifierRecord(Base):
    __tablename__ = "patient_identifier"
    __table_args__ = (Index("ix_patient_identifier_value", "system", "value"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    patient_id: Mapped[str] = mapped_column(ForeignKey("patient.id", ondelete="CASCADE"))
    system: Mapped[str] = mapped_column(String(256))
    value: Mapped[str] = mapped_column(String(128))
    type: Mapped[str] = mapped_column(String(16), default="")
    patient: Mapped[PatientRecord] = relationship(back_populates="identifiers", lazy="raise")


class LinkHistory(Base):
    """Every change of a record's enterprise id, and why."""

    __tablename__ = "link_history"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    patient_id: Mapped[str] = mapped_column(ForeignKey("patient.id", ondelete="CASCADE"), index=True)
    enterprise_id: Mapped[str] = mapped_column(String(36))
    method: Mapped[str] = mapped_column(String(16))
    decided_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime)


outbox_table(metadata)


async def lock_blocking_key(session: AsyncSession, key: str) -> None:
    """Serialise registrations that share a blocking key (PostgreSQL), so two concurrent
    registrations of one person cannot both start a new enterprise id."""
    if session.bind.dialect.name == "postgresql":
        await session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": zlib.crc32(key.encode())})


async def find_record(session: AsyncSession, *, domain: str, local_id: str) -> PatientRecord | None:
    return await session.scalar(
        select(PatientRecord)
        .where(PatientRecord.domain == domain, PatientRecord.local_id == local_id)
        .options(selectinload(PatientRecord.identifiers))
    )


async def national_id_candidates(session: AsyncSession, national_id: str) -> list[Candidate]:
    rows = await session.scalars(
        select(PatientRecord).where(PatientRecord.national_id == national_id).order_by(PatientRecord.created_at)
    )
    return [
        Candidate(
            enterprise_id=EnterpriseId(r.enterprise_id),
            national_id=r.national_id,
            birth_date=r.birth_date,
            gender=Gender(r.gender),
            name_text=r.name_text,
        )
        for r in rows
    ]


def _apply(record: PatientRecord, registration: Registration) -> None:
    record.name_text = registration.name_text
    record.family = registration.family
    record.given = registration.given
    record.gender = registration.gender.value
    record.birth_date = registration.birth_date
    record.national_id = registration.national_id
    record.phones = json.dumps(list(registration.phones))
    record.province = registration.province
    record.city = registration.city
    record.district = registration.district
    record.address_line = registration.address_line
    record.postal_code = registration.postal_code
    record.identifiers = [
        IdentifierRecord(system=i.system, value=i.value, type=i.type) for i in registration.identifiers
    ]
    record.updated_at = utcnow()


async def insert_record(
    session: AsyncSession, registration: Registration, decision: LinkDecision, *, decided_by: str
) -> PatientRecord:
    now = utcnow()
    record = PatientRecord(
        id=str(uuid.uuid4()),
        domain=registration.domain,
        local_id=registration.local_id,
        enterprise_id=decision.enterprise_id,
        link_method=decision.method.value,
        created_at=now,
    )
    _apply(record, registration)
    session.add(record)
    await session.flush()
    session.add(
        LinkHistory(
            patient_id=record.id,
            enterprise_id=decision.enterprise_id,
            method=decision.method.value,
            decided_by=decided_by,
            created_at=now,
        )
    )
    await session.flush()
    return record


async def update_record(session: AsyncSession, record: PatientRecord, registration: Registration) -> PatientRecord:
    _apply(record, registration)
    await session.flush()
    return record


async def records_of_person(session: AsyncSession, enterprise_id: str) -> list[PatientRecord]:
    rows = await session.scalars(
        select(PatientRecord).where(PatientRecord.enterprise_id == enterprise_id).order_by(PatientRecord.created_at)
    )
    return list(rows)


def record_identifiers(record: PatientRecord) -> list[Identifier]:
    return [Identifier(system=i.system, value=i.value, type=i.type) for i in record.identifiers]
