"""The consent service's tables and queries: directives and their revisions, referral /
consultation grants, break-the-glass declarations, and a per-patient version counter that
every change bumps in its own transaction (decision caches compare it on every request)."""

from __future__ import annotations

import datetime
import json

from sqlalchemy import (
    Boolean,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    bindparam,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.consent import provisions
from services.consent.bppc import Directive, DirectiveStatus
from services.consent.policy import AccessGrant, BreakGlass, PatientConsent
from services.shared.db import UtcDateTime
from services.shared.idempotency import idempotency_table
from services.shared.outbox import outbox_table
from services.shared.user_assertion import PURPOSES_OF_USE

metadata = MetaData()


class Base(DeclarativeBase):
    metadata = metadata


class DirectiveRecord(Base):
    __tablename__ = "directive"
    __table_args__ = (UniqueConstraint("recorded_by_organization_id", "idempotency_key", name="uq_directive_idem"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    enterprise_id: Mapped[str] = mapped_column(String(64), index=True)
    patient_domain: Mapped[str] = mapped_column(String(64))
    patient_local_id: Mapped[str] = mapped_column(String(64))
    recorded_by_organization_id: Mapped[str] = mapped_column(String(64))
    recorded_by_practitioner_id: Mapped[str] = mapped_column(String(64), default="")
    policy_ids: Mapped[str] = mapped_column(Text, default="[]")
    evidence_document_id: Mapped[str] = mapped_column(String(64))
    period_start: Mapped[datetime.datetime | None] = mapped_column(UtcDateTime, nullable=True)
    period_end: Mapped[datetime.datetime | None] = mapped_column(UtcDateTime, nullable=True)
    # The provision tree in the JSON form of provisions.provision_to_json.
    provision: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    revision: Mapped[int] = mapped_column(Integer)
    recorded_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime)
    revoked_at: Mapped[datetime.datetime | None] = mapped_column(UtcDateTime, nullable=True)
    idempotency_key: Mapped[str] = mapped_column(String(128))
    # SHA-256 of the recorded request, so a retry can be told from a reuse of its key.
    request_digest: Mapped[str] = mapped_column(String(64))


class DirectiveRevisionRecord(Base):
    """Every state of every directive, as it was recorded, revised or revoked."""

    __tablename__ = "directive_revision"

    directive_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    revision: Mapped[int] = mapped_column(Integer, primary_key=True)
    change: Mapped[str] = mapped_column(String(16))
    body: Mapped[str] = mapped_column(Text)
    organization_id: Mapped[str] = mapped_column(String(64))
    practitioner_id: Mapped[str] = mapped_column(String(64), default="")
    changed_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime)


class GrantRecord(Base):
    __tablename__ = "access_grant"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    reference: Mapped[str] = mapped_column(String(128), unique=True)
    enterprise_id: Mapped[str] = mapped_column(String(64), index=True)
    organization_id: Mapped[str] = mapped_column(String(64))
    purpose_of_use: Mapped[str] = mapped_column(String(32))
    document_ids: Mapped[str] = mapped_column(Text, default="[]")
    include_summary: Mapped[bool] = mapped_column(Boolean, default=True)
    start: Mapped[datetime.datetime] = mapped_column(UtcDateTime)
    end: Mapped[datetime.datetime | None] = mapped_column(UtcDateTime, nullable=True)
    revoked_at: Mapped[datetime.datetime | None] = mapped_column(UtcDateTime, nullable=True)
    created_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime)


class BreakGlassRecord(Base):
    __tablename__ = "break_glass"
    __table_args__ = (Index("ix_break_glass_patient", "enterprise_id", "expires"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    enterprise_id: Mapped[str] = mapped_column(String(64))
    organization_id: Mapped[str] = mapped_column(String(64))
    practitioner_id: Mapped[str] = mapped_column(String(64))
    department: Mapped[str] = mapped_column(String(64), default="")
    # The clinician's stated reason: kept for auditors, never logged or put in events.
    reason: Mapped[str] = mapped_column(Text)
    starts: Mapped[datetime.datetime] = mapped_column(UtcDateTime)
    expires: Mapped[datetime.datetime] = mapped_column(UtcDateTime)


class PatientVersionRecord(Base):
    """Bumped in the transaction of every change to a patient's consent."""

    __tablename__ = "patient_version"

    enterprise_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)


outbox_table(metadata)
# The first answers to keyed directive records (services/shared/idempotency.py).
idempotent_answers = idempotency_table(metadata)


async def bump_version(session: AsyncSession, enterprise_id: str) -> None:
    """Invalidate every replica's cached view of the patient (in the caller's transaction)."""
    t = PatientVersionRecord.__table__
    result = await session.execute(update(t).where(t.c.enterprise_id == enterprise_id).values(version=t.c.version + 1))
    if result.rowcount == 0:  # type: ignore[attr-defined]
        # A concurrent first change of the same patient fails the unique key: the caller retries.
        session.add(PatientVersionRecord(enterprise_id=enterprise_id, version=1))
        await session.flush()


# Built once: the per-request read skips statement construction and most of its cache-key work.
_VERSION = select(PatientVersionRecord.version).where(PatientVersionRecord.enterprise_id == bindparam("enterprise_id"))


async def version_of(connection: AsyncConnection | AsyncSession, enterprise_id: str) -> int:
    """The patient's consent version (0: nothing was ever recorded for them)."""
    return int((await connection.execute(_VERSION, {"enterprise_id": enterprise_id})).scalar() or 0)


def directive_of(record: DirectiveRecord) -> Directive:
    return Directive(
        directive_id=record.id,
        enterprise_id=record.enterprise_id,
        recorded_by_organization_id=record.recorded_by_organization_id,
        provision=provisions.provision_from_json(json.loads(record.provision), purposes=PURPOSES_OF_USE),
        policy_ids=tuple(json.loads(record.policy_ids)),
        evidence_document_id=record.evidence_document_id,
        period=provisions.Period(record.period_start, record.period_end),
        status=DirectiveStatus(record.status),
        revision=record.revision,
        recorded_at=record.recorded_at,
        revoked_at=record.revoked_at,
    )


def grant_of(record: GrantRecord) -> AccessGrant:
    return AccessGrant(
        grant_id=record.id,
        organization_id=record.organization_id,
        purpose_of_use=record.purpose_of_use,
        document_ids=frozenset(json.loads(record.document_ids)),
        include_summary=record.include_summary,
        start=record.start,
        end=record.end,
        revoked=record.revoked_at is not None,
        reference=record.reference,
        revoked_at=record.revoked_at,
    )


def break_glass_of(record: BreakGlassRecord) -> BreakGlass:
    return BreakGlass(
        break_glass_id=record.id,
        organization_id=record.organization_id,
        practitioner_id=record.practitioner_id,
        starts=record.starts,
        expires=record.expires,
        department=record.department,
    )


async def load_patient(session: AsyncSession, enterprise_id: str) -> PatientConsent:
    """Everything recorded about the patient's consent (revoked and expired included: a decision
    at a past moment needs them, and the rules ignore them now)."""
    directives = (
        await session.scalars(
            select(DirectiveRecord)
            .where(DirectiveRecord.enterprise_id == enterprise_id)
            .order_by(DirectiveRecord.recorded_at, DirectiveRecord.id)
        )
    ).all()
    grants = (
        await session.scalars(
            select(GrantRecord).where(GrantRecord.enterprise_id == enterprise_id).order_by(GrantRecord.created_at)
        )
    ).all()
    glass = (
        await session.scalars(
            select(BreakGlassRecord)
            .where(BreakGlassRecord.enterprise_id == enterprise_id)
            .order_by(BreakGlassRecord.starts)
        )
    ).all()
    return PatientConsent(
        directives=tuple(directive_of(d) for d in directives),
        grants=tuple(grant_of(g) for g in grants),
        break_glass=tuple(break_glass_of(b) for b in glass),
    )
