"""Tables and queries for the stewards' work on the review queue (who holds which task) and for
the first answer of an idempotent registration. Kept apart from `store.py`; same metadata."""

from __future__ import annotations

import datetime

from sqlalchemy import Boolean, ForeignKey, Index, String, and_, delete, or_, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from services.mpi.tables import Base, PatientRecord, ReviewTask
from services.shared.db import UtcDateTime
from services.shared.idempotency import idempotency_table

ANY, MINE, UNASSIGNED = "any", "mine", "unassigned"


class ReviewAssignment(Base):
    """The steward holding an open review task: one row per held task, gone when released. A
    decided task keeps its row (who held it when it was decided). The claim is a lease from
    `assigned_at` (`domain.ClaimLease`); a lapsed row stays until someone takes the task, and the
    taker's row names the steward whose claim had lapsed (`lapsed_*`), so that steward is told why
    the task is no longer theirs."""

    __tablename__ = "review_assignment"
    __table_args__ = (Index("ix_review_assignment_assignee", "organization_id", "assignee"),)

    task_id: Mapped[str] = mapped_column(ForeignKey("review_task.id", ondelete="CASCADE"), primary_key=True)
    # The steward: a practitioner id within their organisation (user assertions are per hospital).
    organization_id: Mapped[str] = mapped_column(String(64))
    assignee: Mapped[str] = mapped_column(String(64))
    assigned_by: Mapped[str] = mapped_column(String(64))
    assigned_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime)
    # The steward whose lapsed claim this one replaced (none for a first claim or a hand-over).
    lapsed_organization_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lapsed_assignee: Mapped[str | None] = mapped_column(String(64), nullable=True)


class RegistrationKey(Base):
    """The first answer to a registration carrying an idempotency key: a retry with the same key
    gets it again (created flag, link method, audit event) instead of being applied as an update.
    No demographics: the request is kept only as a keyed fingerprint."""

    __tablename__ = "registration_key"

    organization_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(128), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    record_id: Mapped[str] = mapped_column(String(36))
    created: Mapped[bool] = mapped_column(Boolean)
    link_method: Mapped[str] = mapped_column(String(16))
    audit_event_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime)


# --- review assignment ------------------------------------------------------------------------


async def assignment(session: AsyncSession, task_id: str) -> ReviewAssignment | None:
    return await session.get(ReviewAssignment, task_id)


async def assignments(session: AsyncSession, task_ids: list[str]) -> dict[str, ReviewAssignment]:
    if not task_ids:
        return {}
    rows = await session.scalars(select(ReviewAssignment).where(ReviewAssignment.task_id.in_(task_ids)))
    return {r.task_id: r for r in rows}


async def assign(
    session: AsyncSession,
    *,
    task_id: str,
    organization_id: str,
    assignee: str,
    assigned_by: str,
    at: datetime.datetime,
    lapsed: tuple[str, str] | None = None,
) -> ReviewAssignment:
    """Give the task to a steward (the caller has locked the task row and checked who held it);
    `lapsed`: the (organisation, steward) whose lapsed claim this replaces."""
    row = await session.get(ReviewAssignment, task_id)
    if row is None:
        row = ReviewAssignment(task_id=task_id)
        session.add(row)
    row.organization_id = organization_id
    row.assignee = assignee
    row.assigned_by = assigned_by
    row.assigned_at = at
    row.lapsed_organization_id, row.lapsed_assignee = lapsed or (None, None)
    await session.flush()
    return row


async def release(session: AsyncSession, task_id: str) -> None:
    await session.execute(delete(ReviewAssignment).where(ReviewAssignment.task_id == task_id))


async def open_review_tasks(
    session: AsyncSession,
    *,
    limit: int,
    after: tuple[datetime.datetime, str] | None,
    domain: str | None = None,
    filter: str = ANY,
    organization_id: str = "",
    assignee: str = "",
    lapsed_before: datetime.datetime | None = None,
) -> list[tuple[ReviewTask, ReviewAssignment | None]]:
    """Open tasks oldest first, after the (created, id) of the previous page's last task (keyset:
    tasks created in the same instant are neither skipped nor repeated). `domain`: tasks with a
    record of that domain on either side. `filter`: any, mine (claimed by organization_id /
    assignee, lapsed or not: nobody else has taken them), unassigned (no claim, or one made at or
    before `lapsed_before`)."""
    query = (
        select(ReviewTask, ReviewAssignment)
        .outerjoin(ReviewAssignment, ReviewAssignment.task_id == ReviewTask.id)
        .where(ReviewTask.status == "open")
    )
    if after is not None:
        query = query.where(tuple_(ReviewTask.created_at, ReviewTask.id) > tuple_(after[0], after[1]))
    if domain is not None:
        mine = select(PatientRecord.id).where(PatientRecord.domain == domain)
        query = query.where(or_(ReviewTask.patient_id.in_(mine), ReviewTask.candidate_id.in_(mine)))
    if filter == MINE:
        query = query.where(
            and_(ReviewAssignment.organization_id == organization_id, ReviewAssignment.assignee == assignee)
        )
    elif filter == UNASSIGNED:
        unclaimed = ReviewAssignment.task_id.is_(None)
        if lapsed_before is not None:
            unclaimed = or_(unclaimed, ReviewAssignment.assigned_at <= lapsed_before)
        query = query.where(unclaimed)
    rows = await session.execute(query.order_by(ReviewTask.created_at, ReviewTask.id).limit(limit))
    return [(task, held) for task, held in rows]


# --- idempotent registration ------------------------------------------------------------------


async def registration_by_key(session: AsyncSession, organization_id: str, key: str) -> RegistrationKey | None:
    return await session.get(RegistrationKey, (organization_id, key))


async def add_registration_key(
    session: AsyncSession,
    *,
    organization_id: str,
    key: str,
    fingerprint: str,
    record_id: str,
    created: bool,
    link_method: str,
    audit_event_id: str,
    at: datetime.datetime,
) -> None:
    """Remember the first answer; a concurrent first use of the key fails on the primary key."""
    session.add(
        RegistrationKey(
            organization_id=organization_id,
            idempotency_key=key,
            fingerprint=fingerprint,
            record_id=record_id,
            created=created,
            link_method=link_method,
            audit_event_id=audit_event_id,
            created_at=at,
        )
    )
    await session.flush()


# --- first answers of the steward operations --------------------------------------------------

# Link, unlink, merge, unmerge and the review-task moves keep their first answer here, sealed
# (services/shared/idempotency.py; the answers name patients, so they are encrypted at rest).
idempotent_answers = idempotency_table(Base.metadata)
