"""The referral service's tables: referrals, their history and deadline clocks (the workflow
engine's), slots, bed counts and the follow-up tasks of down-referrals."""

from __future__ import annotations

import datetime

from sqlalchemy import Index, MetaData, String, Text, UniqueConstraint, or_, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.shared.db import UtcDateTime
from services.shared.errors import FailedPrecondition
from services.shared.idempotency import idempotency_table
from services.shared.outbox import outbox_table
from services.shared.workflow.engine import WorkflowTables, clock_table

metadata = MetaData()


class Base(DeclarativeBase):
    metadata = metadata


class ReferralRecord(Base):
    __tablename__ = "referral"
    __table_args__ = (
        UniqueConstraint("requester_organization_id", "idempotency_key", name="uq_referral_idem"),
        UniqueConstraint("referral_number", name="uq_referral_number"),
        Index("ix_referral_episode", "episode_id"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    patient_domain: Mapped[str] = mapped_column(String(64))
    patient_local_id: Mapped[str] = mapped_column(String(64))
    requester_organization_id: Mapped[str] = mapped_column(String(64), index=True)
    # Empty while candidates are asked and none has accepted.
    target_organization_id: Mapped[str] = mapped_column(String(64), index=True)
    direction: Mapped[int]
    # Before migration 0005 the reason in clear; since, empty (it is in `sealed`).
    reason: Mapped[str] = mapped_column(Text)
    state: Mapped[int]
    # Compare-and-set of the workflow engine: every move bumps it.
    version: Mapped[int] = mapped_column(default=0, server_default="0")
    document_ids: Mapped[str] = mapped_column(Text, default="[]")
    idempotency_key: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime)
    referral_number: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # The patient's enterprise id at creation (statistics and deadline events; moves ask the mpi).
    enterprise_id: Mapped[str] = mapped_column(String(64), default="", server_default="")
    origin_tier: Mapped[str] = mapped_column(String(16), default="", server_default="")
    target_tier: Mapped[str] = mapped_column(String(16), default="", server_default="")
    urgency: Mapped[str] = mapped_column(String(16), default="routine", server_default="routine")
    service: Mapped[str] = mapped_column(String(16), default="outpatient", server_default="outpatient")
    diagnosis_code: Mapped[str] = mapped_column(String(16), default="", server_default="")
    target_department: Mapped[str] = mapped_column(String(64), default="", server_default="")
    target_practitioner_id: Mapped[str] = mapped_column(String(64), default="", server_default="")
    # JSON list of {"org": id, "tier": tier}: the organisations asked ([] for a single target).
    candidates: Mapped[str] = mapped_column(Text, default="[]", server_default="[]")
    # Free text sealed at rest (reason, diagnosis text, clinical summary, contact, advice, care plan
    # medication and warning signs): services/shared/protection, context referral.sealed:<id>.
    sealed: Mapped[str | None] = mapped_column(Text, nullable=True)
    business_status: Mapped[str] = mapped_column(String(32), default="2.0", server_default="2.0")
    rejection_code: Mapped[str] = mapped_column(String(32), default="", server_default="")
    slot_id: Mapped[str] = mapped_column(String(36), default="", server_default="")
    appointment_start: Mapped[datetime.datetime | None] = mapped_column(UtcDateTime, nullable=True)
    bed_department: Mapped[str] = mapped_column(String(64), default="", server_default="")
    outcome_document_id: Mapped[str] = mapped_column(String(64), default="", server_default="")
    episode_id: Mapped[str] = mapped_column(String(36), default="", server_default="")
    parent_referral_id: Mapped[str] = mapped_column(String(36), default="", server_default="")
    accepted_at: Mapped[datetime.datetime | None] = mapped_column(UtcDateTime, nullable=True)
    scheduled_at: Mapped[datetime.datetime | None] = mapped_column(UtcDateTime, nullable=True)
    completed_at: Mapped[datetime.datetime | None] = mapped_column(UtcDateTime, nullable=True)
    closed_at: Mapped[datetime.datetime | None] = mapped_column(UtcDateTime, nullable=True)


class ReferralStateChangeRecord(Base):
    """Every move of every referral: who moved it (organisation, practitioner, role), from what, to
    what, when, why (sealed: context referral.history:<id>), and the request key of a retry."""

    __tablename__ = "referral_state_change"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    referral_id: Mapped[str] = mapped_column(String(36), index=True)
    from_state: Mapped[int]
    to_state: Mapped[int]
    move: Mapped[str] = mapped_column(String(32), default="", server_default="")
    organization_id: Mapped[str] = mapped_column(String(64))
    practitioner_id: Mapped[str] = mapped_column(String(64), default="")
    role: Mapped[str] = mapped_column(String(32), default="", server_default="")
    reason: Mapped[str] = mapped_column(Text, default="")
    request_key: Mapped[str] = mapped_column(String(128), default="", server_default="")
    changed_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime)


class SlotRecord(Base):
    """A bookable appointment slot a receiving organisation publishes (FHIR Slot); held by at most
    one referral (`referral_id`, taken by a conditional UPDATE)."""

    __tablename__ = "slot"
    __table_args__ = (Index("ix_slot_org_department_start", "organization_id", "department", "start_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(64))
    department: Mapped[str] = mapped_column(String(64))
    start_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime)
    end_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime)
    referral_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    created_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime)


class BedCountRecord(Base):
    """A department's admission beds for referrals: how many, how many reserved."""

    __tablename__ = "bed_count"

    organization_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    department: Mapped[str] = mapped_column(String(64), primary_key=True)
    total: Mapped[int]
    reserved: Mapped[int] = mapped_column(default=0)


class FollowUpRecord(Base):
    """A follow-up task of a down-referral's care plan, for the community organisation."""

    __tablename__ = "follow_up"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    referral_id: Mapped[str] = mapped_column(String(36), index=True)
    organization_id: Mapped[str] = mapped_column(String(64), index=True)
    seq: Mapped[int]
    due_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime)
    # {"description", "note"} sealed: context referral.follow_up:<id>.
    sealed: Mapped[str] = mapped_column(Text)
    done_at: Mapped[datetime.datetime | None] = mapped_column(UtcDateTime, nullable=True)
    done_by: Mapped[str] = mapped_column(String(64), default="", server_default="")


outbox_table(metadata)
TABLES = WorkflowTables(
    item=ReferralRecord.__table__,  # type: ignore[arg-type]
    history=ReferralStateChangeRecord.__table__,  # type: ignore[arg-type]
    item_fk="referral_id",
    clocks=clock_table(metadata, "referral_clock"),
)


def sealed_context(referral_id: str) -> str:
    return f"referral.sealed:{referral_id}"


def history_context(history_id: str) -> str:
    return f"referral.history:{history_id}"


def follow_up_context(follow_up_id: str) -> str:
    return f"referral.follow_up:{follow_up_id}"


# --- slots and beds: taken and given back inside a move's transaction -----------------------


async def book_slot(session: AsyncSession, slot_id: str, organization_id: str, referral_id: str) -> SlotRecord:
    """Take a free slot of `organization_id` for a referral: one conditional UPDATE, so of two
    referrals racing for one slot exactly one gets it."""
    taken = await session.execute(
        update(SlotRecord)
        .where(
            SlotRecord.id == slot_id,
            SlotRecord.organization_id == organization_id,
            or_(SlotRecord.referral_id.is_(None), SlotRecord.referral_id == referral_id),
        )
        .values(referral_id=referral_id)
    )
    if taken.rowcount != 1:  # type: ignore[attr-defined]
        raise FailedPrecondition("the slot is taken or not the target's: slot_id", reason="referral-slot-taken")
    slot = await session.get(SlotRecord, slot_id, populate_existing=True)
    assert slot is not None
    return slot


async def free_slot(session: AsyncSession, record: ReferralRecord) -> None:
    if record.slot_id:
        await session.execute(
            update(SlotRecord)
            .where(SlotRecord.id == record.slot_id, SlotRecord.referral_id == record.id)
            .values(referral_id=None)
        )


async def reserve_bed(session: AsyncSession, organization_id: str, department: str) -> None:
    reserved = await session.execute(
        update(BedCountRecord)
        .where(
            BedCountRecord.organization_id == organization_id,
            BedCountRecord.department == department,
            BedCountRecord.reserved < BedCountRecord.total,
        )
        .values(reserved=BedCountRecord.reserved + 1)
    )
    if reserved.rowcount != 1:  # type: ignore[attr-defined]
        raise FailedPrecondition("no free bed in that department: bed_department", reason="referral-no-bed")


async def release_bed(session: AsyncSession, record: ReferralRecord) -> None:
    if record.bed_department:
        await session.execute(
            update(BedCountRecord)
            .where(
                BedCountRecord.organization_id == record.target_organization_id,
                BedCountRecord.department == record.bed_department,
                BedCountRecord.reserved > 0,
            )
            .values(reserved=BedCountRecord.reserved - 1)
        )


# The first answers to keyed creations and moves (services/shared/idempotency.py).
idempotent_answers = idempotency_table(metadata)
