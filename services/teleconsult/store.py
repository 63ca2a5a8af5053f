"""The teleconsult service's tables."""

from __future__ import annotations

import datetime

from sqlalchemy import MetaData, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.shared.db import UtcDateTime
from services.shared.idempotency import idempotency_table
from services.shared.outbox import outbox_table
from services.shared.workflow.engine import WorkflowTables, clock_table

metadata = MetaData()


class Base(DeclarativeBase):
    metadata = metadata


class ConsultationRecord(Base):
    __tablename__ = "consultation"
    __table_args__ = (UniqueConstraint("requester_organization_id", "idempotency_key", name="uq_consultation_idem"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    patient_domain: Mapped[str] = mapped_column(String(64))
    patient_local_id: Mapped[str] = mapped_column(String(64))
    requester_organization_id: Mapped[str] = mapped_column(String(64), index=True)
    consultant_organization_id: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[int]
    mode: Mapped[int]
    question: Mapped[str] = mapped_column(Text)
    state: Mapped[int]
    # Compare-and-set of the workflow engine: every move bumps it.
    version: Mapped[int] = mapped_column(default=0, server_default="0")
    document_ids: Mapped[str] = mapped_column(Text, default="[]")
    idempotency_key: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime)


class ConsultationStateChangeRecord(Base):
    """Every state change of every consultation."""

    __tablename__ = "consultation_state_change"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    consultation_id: Mapped[str] = mapped_column(String(36), index=True)
    from_state: Mapped[int]
    to_state: Mapped[int]
    move: Mapped[str] = mapped_column(String(32), default="", server_default="")
    organization_id: Mapped[str] = mapped_column(String(64))
    practitioner_id: Mapped[str] = mapped_column(String(64), default="")
    role: Mapped[str] = mapped_column(String(32), default="", server_default="")
    reason: Mapped[str] = mapped_column(Text, default="")
    request_key: Mapped[str] = mapped_column(String(128), default="", server_default="")
    changed_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime)


outbox_table(metadata)
TABLES = WorkflowTables(
    item=ConsultationRecord.__table__,  # type: ignore[arg-type]
    history=ConsultationStateChangeRecord.__table__,  # type: ignore[arg-type]
    item_fk="consultation_id",
    clocks=clock_table(metadata, "consultation_clock"),
)
# The first answers to keyed creations and moves (services/shared/idempotency.py).
idempotent_answers = idempotency_table(metadata)
