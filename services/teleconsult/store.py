"""The teleconsult service's tables."""

from __future__ import annotations

import datetime

from sqlalchemy import Boolean, Index, MetaData, String, Text, UniqueConstraint
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
    # Empty since migration 0005 (which sealed existing questions in place): the text is in `sealed`.
    question: Mapped[str] = mapped_column(Text)
    state: Mapped[int]
    # Compare-and-set of the workflow engine: every move bumps it.
    version: Mapped[int] = mapped_column(default=0, server_default="0")
    document_ids: Mapped[str] = mapped_column(Text, default="[]")
    idempotency_key: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime)
    urgency: Mapped[int] = mapped_column(default=1, server_default="1")
    # The application form's free text (question, purpose, record summary) sealed at rest:
    # services/shared/protection, context consultation.sealed:<id>.
    sealed: Mapped[str | None] = mapped_column(Text, nullable=True)
    department: Mapped[str] = mapped_column(String(64), default="", server_default="")
    specialty: Mapped[str] = mapped_column(String(64), default="", server_default="")
    professional_title: Mapped[str] = mapped_column(String(32), default="", server_default="")
    invited_practitioner_id: Mapped[str] = mapped_column(String(64), default="", server_default="")
    any_available: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    # [{"study_instance_uid", "wado_rs_url", "document_id"}]
    imaging_studies: Mapped[str] = mapped_column(Text, default="[]", server_default="[]")
    # {"evidence_document_id", "signer", "guardian_name", "guardian_relationship", "signed"} or "".
    informed_consent: Mapped[str] = mapped_column(Text, default="", server_default="")
    business_status: Mapped[str] = mapped_column(String(32), default="requested", server_default="requested")
    decline_code: Mapped[str] = mapped_column(String(32), default="", server_default="")
    appointment_start: Mapped[datetime.datetime | None] = mapped_column(UtcDateTime, nullable=True)
    appointment_end: Mapped[datetime.datetime | None] = mapped_column(UtcDateTime, nullable=True)
    join_url: Mapped[str] = mapped_column(String(512), default="", server_default="")
    report_version: Mapped[int] = mapped_column(default=0, server_default="0")
    # When the first final report was signed (turnaround = reported_at - created_at, pauses included).
    reported_at: Mapped[datetime.datetime | None] = mapped_column(UtcDateTime, nullable=True)


class ParticipantRecord(Base):
    """The specialists assigned to a consultation (several for an MDT)."""

    __tablename__ = "consultation_participant"

    consultation_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    practitioner_id: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)


class MessageRecord(Base):
    """The Communication thread of a consultation (more information requested / provided)."""

    __tablename__ = "consultation_message"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    consultation_id: Mapped[str] = mapped_column(String(36), index=True)
    organization_id: Mapped[str] = mapped_column(String(64))
    practitioner_id: Mapped[str] = mapped_column(String(64), default="")
    move: Mapped[str] = mapped_column(String(32))
    # {"text", "document_ids"} sealed: context consultation.message:<id>.
    sealed: Mapped[str] = mapped_column(Text)
    sent_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime)


class ReportRecord(Base):
    """One version of a consultation's report; a final version is never changed (an amendment is a
    new version, and the one before becomes superseded)."""

    __tablename__ = "consultation_report"
    __table_args__ = (UniqueConstraint("consultation_id", "version", name="uq_consultation_report_version"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    consultation_id: Mapped[str] = mapped_column(String(36), index=True)
    version: Mapped[int]
    # preliminary | final | amended | superseded
    status: Mapped[str] = mapped_column(String(16))
    # {"content", "diagnostic_report"} sealed: context consultation.report:<id>.
    sealed: Mapped[str] = mapped_column(Text)
    signature_jws: Mapped[str] = mapped_column(Text, default="")
    signer_jwk: Mapped[str] = mapped_column(Text, default="")
    signer_practitioner_id: Mapped[str] = mapped_column(String(64), default="")
    signed_at: Mapped[datetime.datetime | None] = mapped_column(UtcDateTime, nullable=True)
    document_id: Mapped[str] = mapped_column(String(36), default="")
    sha256: Mapped[str] = mapped_column(String(64), default="")
    # National-algorithms option: the exchange's SM2 co-signature (hex), else "".
    sm2_signature: Mapped[str] = mapped_column(Text, default="", server_default="")
    created_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime)


class SpecialistRecord(Base):
    """The specialist directory: one row per organisation and practitioner."""

    __tablename__ = "specialist"

    organization_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    practitioner_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), default="")
    role: Mapped[str] = mapped_column(String(32), default="doctor")
    department: Mapped[str] = mapped_column(String(64), default="")
    specialty: Mapped[str] = mapped_column(String(64), default="")
    professional_title: Mapped[str] = mapped_column(String(32), default="")
    years_independent_practice: Mapped[int] = mapped_column(default=0)
    # JSON list of ConsultationKind numbers.
    kinds: Mapped[str] = mapped_column(Text, default="[]")
    active: Mapped[bool] = mapped_column(Boolean, default=True)


class RosterShiftRecord(Base):
    """Who reads which consultation type on call, when."""

    __tablename__ = "roster_shift"
    __table_args__ = (Index("ix_roster_shift_org_kind", "organization_id", "kind", "start_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(64))
    practitioner_id: Mapped[str] = mapped_column(String(64))
    kind: Mapped[int]
    start_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime)
    end_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime)


class SlotRecord(Base):
    """A bookable period of one specialist; `consultation_id` is set while a session holds it
    (booking is a conditional UPDATE on it being empty, for every participant in one transaction)."""

    __tablename__ = "consultation_slot"
    __table_args__ = (
        UniqueConstraint("organization_id", "practitioner_id", "start_at", name="uq_consultation_slot_start"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(64))
    practitioner_id: Mapped[str] = mapped_column(String(64))
    start_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime)
    end_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime)
    consultation_id: Mapped[str | None] = mapped_column(String(36), nullable=True, index=True)


def sealed_context(consultation_id: str) -> str:
    return f"consultation.sealed:{consultation_id}"


def message_context(message_id: str) -> str:
    return f"consultation.message:{message_id}"


def report_context(report_id: str) -> str:
    return f"consultation.report:{report_id}"


def history_context(history_id: str) -> str:
    """A move's reason (the engine's history row), sealed through the engine's `seal_reason`."""
    return f"consultation.history:{history_id}"


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
