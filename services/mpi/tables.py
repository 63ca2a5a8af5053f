"""The mpi's tables (its database schema, as Alembic's migrations build it; no personal data in
clear: see sealing.py)."""

from __future__ import annotations

import datetime

from sqlalchemy import (
    Date,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.mpi.domain import Identifier
from services.shared.db import UtcDateTime
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
        Index("ix_patient_national_id_index", "national_id_index"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    domain: Mapped[str] = mapped_column(String(64))
    local_id: Mapped[str] = mapped_column(String(64))
    enterprise_id: Mapped[str] = mapped_column(String(36))
    # Name, national id, phones, street address and identifier values: see RecordSealing.
    sealed: Mapped[str] = mapped_column(Text)
    national_id_index: Mapped[str | None] = mapped_column(String(32), nullable=True)
    gender: Mapped[str] = mapped_column(String(8))
    birth_date: Mapped[datetime.date | None] = mapped_column(Date, nullable=True)
    province: Mapped[str] = mapped_column(String(32), default="")
    city: Mapped[str] = mapped_column(String(32), default="")
    district: Mapped[str] = mapped_column(String(32), default="")
    postal_code: Mapped[str] = mapped_column(String(12), default="")
    link_method: Mapped[str] = mapped_column(String(16))
    # The weight of the comparison that made the current link (probabilistic links), else null.
    link_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    linked_at: Mapped[datetime.datetime | None] = mapped_column(UtcDateTime, nullable=True)
    # Set when the hospital merged this record into another of its own (A40): the record is
    # retired (no blocking keys, not a candidate) until an unmerge.
    merged_into: Mapped[str | None] = mapped_column(String(36), nullable=True)
    created_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime)

    # The opened personal data: plain attributes the ORM neither maps nor flushes (only `sealed`
    # is a column), set on load from the database and by `RecordSealing.apply` on write.
    __allow_unmapped__ = True
    name_text: str
    family: str
    given: str
    national_id: str | None
    phones: list[str]
    address_line: str
    identifiers: list[Identifier]


class IdentifierRecord(Base):
    """An identifier of a record, for exact lookup: the value only as its blind index (the value
    itself is in the record's sealed data)."""

    __tablename__ = "patient_identifier"
    __table_args__ = (Index("ix_patient_identifier_value_index", "system", "value_index"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    patient_id: Mapped[str] = mapped_column(ForeignKey("patient.id", ondelete="CASCADE"), index=True)
    system: Mapped[str] = mapped_column(String(256))
    value_index: Mapped[str] = mapped_column(String(32))
    type: Mapped[str] = mapped_column(String(16), default="")


class LinkHistory(Base):
    """Every change of a record's enterprise id, and why (append-only)."""

    __tablename__ = "link_history"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    patient_id: Mapped[str] = mapped_column(ForeignKey("patient.id", ondelete="CASCADE"), index=True)
    enterprise_id: Mapped[str] = mapped_column(String(36))
    method: Mapped[str] = mapped_column(String(16))
    decided_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime)
    previous_enterprise_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    score: Mapped[float | None] = mapped_column(Float, nullable=True)
    # register, update, review-same, link, unlink, merge, unmerge
    reason: Mapped[str] = mapped_column(String(32), default="", server_default="")


class BlockingKey(Base):
    """Candidate search index: a record under each of its blocking keys (see matching.blocking_keys)."""

    __tablename__ = "blocking_key"
    __table_args__ = (Index("ix_blocking_key_patient", "patient_id"),)

    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    patient_id: Mapped[str] = mapped_column(ForeignKey("patient.id", ondelete="CASCADE"), primary_key=True)


class NameFrequency(Base):
    """How many active records carry each name value (pinyin), per field; value "" is the total."""

    __tablename__ = "name_frequency"

    field: Mapped[str] = mapped_column(String(16), primary_key=True)
    value: Mapped[str] = mapped_column(String(64), primary_key=True)
    count: Mapped[int] = mapped_column(Integer, default=0)


class ReviewTask(Base):
    """A pair of records the matcher could not decide: for a data steward."""

    __tablename__ = "review_task"
    __table_args__ = (
        Index("ix_review_task_status", "status", "created_at"),
        Index("ix_review_task_pair", "patient_id", "candidate_id"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    patient_id: Mapped[str] = mapped_column(ForeignKey("patient.id", ondelete="CASCADE"))
    candidate_id: Mapped[str] = mapped_column(ForeignKey("patient.id", ondelete="CASCADE"))
    score: Mapped[float] = mapped_column(Float)
    # JSON: {field: [level, weight]}
    comparison: Mapped[str] = mapped_column(Text)
    hold: Mapped[str] = mapped_column(String(32), default="")
    # open, same, different, closed (the pair became one person another way)
    status: Mapped[str] = mapped_column(String(16), default="open")
    created_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime)
    decided_at: Mapped[datetime.datetime | None] = mapped_column(UtcDateTime, nullable=True)
    decided_by: Mapped[str] = mapped_column(String(64), default="")


class NonMatch(Base):
    """A steward's decision that two records are different people (never proposed again).
    Stored once per pair, the smaller record id first."""

    __tablename__ = "non_match"
    __table_args__ = (Index("ix_non_match_b", "patient_b"),)

    patient_a: Mapped[str] = mapped_column(ForeignKey("patient.id", ondelete="CASCADE"), primary_key=True)
    patient_b: Mapped[str] = mapped_column(ForeignKey("patient.id", ondelete="CASCADE"), primary_key=True)
    decided_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime)


class MergeRecord(Base):
    """A hospital merged one of its local records into another (ADT^A40 / Merge), with what
    moved, so an unmerge can put it back."""

    __tablename__ = "merge"
    __table_args__ = (Index("ix_merge_subsumed", "subsumed_id"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    domain: Mapped[str] = mapped_column(String(64))
    survivor_id: Mapped[str] = mapped_column(ForeignKey("patient.id", ondelete="CASCADE"))
    subsumed_id: Mapped[str] = mapped_column(ForeignKey("patient.id", ondelete="CASCADE"))
    # JSON: [[patient_id, enterprise id before the merge], ...] of every record that moved.
    moved: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime)
    decided_by: Mapped[str] = mapped_column(String(64))
    undone_at: Mapped[datetime.datetime | None] = mapped_column(UtcDateTime, nullable=True)


class InboundMessage(Base):
    """HL7 v2 messages applied (or refused as AE), by sending facility and control id (MSH-10),
    so a retried message gets its first answer instead of being applied twice."""

    __tablename__ = "inbound_message"

    facility: Mapped[str] = mapped_column(String(64), primary_key=True)
    control_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    ack_code: Mapped[str] = mapped_column(String(2))
    reason: Mapped[str] = mapped_column(String(64), default="")
    received_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime)
    # SHA-256 of the message's content (mllp.content_digest): a retry has the same, a different
    # message reusing the control id does not. Empty for rows from before it was kept.
    digest: Mapped[str] = mapped_column(String(64), default="", server_default="")


class BulkLoad(Base):
    """Progress of a bulk load (`hie mpi load`), committed with each batch so a resumed load
    neither loses nor repeats a row."""

    __tablename__ = "bulk_load"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    domain: Mapped[str] = mapped_column(String(64))
    rows_done: Mapped[int] = mapped_column(Integer, default=0)
    counts: Mapped[str] = mapped_column(Text, default="{}")
    updated_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime)


class MatchEstimate(Base):
    """An estimate of m / u per comparison level learned from the index's own records (EM), with
    what it rests on. Aggregates only: no record, name or value is in it. The latest one is in
    force (over the shipped priors) unless an operator names a parameters file."""

    __tablename__ = "match_estimate"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    estimated_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime)
    # bulk-load (a load's rows against the index, before they are decided), index (stored
    # records against each other), on-demand (`hie mpi weights --estimate`).
    source: Mapped[str] = mapped_column(String(32))
    records: Mapped[int] = mapped_column(Integer)
    candidate_pairs: Mapped[int] = mapped_column(Integer)
    random_pairs: Mapped[int] = mapped_column(Integer)
    # {"prior_match": p, "fields": {field: {level: [m, u]}}}
    parameters: Mapped[str] = mapped_column(Text)


outbox_table(metadata)
