"""The teleconsult service's tables."""

from __future__ import annotations

import datetime

from sqlalchemy import MetaData, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.shared.db import UtcDateTime
from services.shared.idempotency import idempotency_table
from services.shared.outbox import outbox_table

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
    organization_id: Mapped[str] = mapped_column(String(64))
    practitioner_id: Mapped[str] = mapped_column(String(64), default="")
    reason: Mapped[str] = mapped_column(Text, default="")
    changed_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime)


outbox_table(metadata)
# The first answers to keyed creations and moves (services/shared/idempotency.py).
idempotent_answers = idempotency_table(metadata)
