"""The mpi's tables and queries.

Personal data is never stored in clear. A record's direct identifiers and name text (name,
national id, phones, street address, other identifier values) are sealed together in one
authenticated ciphertext (`patient.sealed`, bound to the record id); exact lookups go through
keyed blind indexes: the national id, identifier values, every blocking key and every name value
of the frequency table are stored as HMAC digests. The matcher still compares clear values: they
are opened when a record is loaded (an ORM load hook reads the session's `RecordSealing`), at a
few microseconds per candidate. Birth date, gender and the address down to the district stay in
clear: the blocking keys and the masking policy's district level need them, and they identify no
one on their own.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

from sqlalchemy import (
    Date,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Row,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    bindparam,
    delete,
    event,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    tuple_,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, QueryContext, Session, mapped_column

from services.mpi.domain import Identifier, Registration
from services.mpi.matching import MatchRecord, ValueFrequencies, match_record
from services.shared.db import UtcDateTime, utcnow
from services.shared.errors import DataCorruption
from services.shared.outbox import outbox_table
from services.shared.protection import DataProtection, TamperedCiphertextError
from services.shared.protection.keyring import UnknownKeyError

metadata = MetaData()
_log = logging.getLogger(__name__)


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


# Where a session finds the sealing (see `sealed_sessions`).
_SEALING = "mpi.sealing"


class RecordSealing:
    """How the mpi stores personal data: one sealed blob per record, blind indexes for lookups."""

    def __init__(self, protection: DataProtection) -> None:
        self._protection = protection

    # -- blind indexes (the same value gives the same digest; the database never sees the value)
    def key(self, blocking_key: str) -> str:
        return self._protection.index.digest("mpi.blocking-key", blocking_key)

    def national_id(self, value: str) -> str:
        return self._protection.index.digest("national-id", value)

    def identifier(self, system: str, value: str) -> str:
        return self._protection.index.digest("identifier", f"{system}|{value}")

    def name_value(self, field: str, value: str) -> str:
        """A name value of the frequency table ("" stays "": it is the field's total row)."""
        return self._protection.index.digest("mpi.name", f"{field}|{value}") if value else ""

    # -- the sealed blob
    def seal(self, record_id: str, registration: Registration) -> str:
        return self._seal_document(record_id, _personal_data(registration))

    def _seal_document(self, record_id: str, document: dict[str, Any]) -> str:
        return self._protection.fields.encrypt(
            json.dumps(document, ensure_ascii=False, separators=(",", ":")), context=sealed_context(record_id)
        )

    def open(self, record_id: str, sealed: str) -> dict[str, Any]:
        """The opened personal data; DataCorruption if it was altered, moved to another row, or is
        under a key this process does not hold (never a guess)."""
        try:
            return json.loads(self._protection.fields.decrypt(sealed, context=sealed_context(record_id)))
        except (TamperedCiphertextError, UnknownKeyError):
            _log.error("mpi record %s failed its integrity check", record_id)
            raise DataCorruption("a patient record failed its integrity check", reason="record-corrupt") from None

    def apply(self, record: PatientRecord, registration: Registration) -> None:
        """Write a registration's personal data to a record: sealed column, indexes, opened view
        (from the registration itself: nothing is decrypted on the way in)."""
        document = _personal_data(registration)
        record.sealed = self._seal_document(record.id, document)
        record.national_id_index = self._national_id_index(registration)
        _set_opened(record, document)

    def row(self, record_id: str, registration: Registration) -> dict[str, Any]:
        """The personal-data columns of a new patient row (bulk insert)."""
        return {
            "sealed": self.seal(record_id, registration),
            "national_id_index": self._national_id_index(registration),
        }

    def _national_id_index(self, registration: Registration) -> str | None:
        return self.national_id(registration.national_id) if registration.national_id else None

    def identifier_rows(self, record_id: str, registration: Registration) -> list[dict[str, Any]]:
        return [
            {
                "patient_id": record_id,
                "system": i.system,
                "value_index": self.identifier(i.system, i.value),
                "type": i.type,
            }
            for i in registration.identifiers
        ]


def _personal_data(registration: Registration) -> dict[str, Any]:
    """What a record seals, in the shape `RecordSealing.open` returns."""
    return {
        "text": registration.name_text,
        "family": registration.family,
        "given": registration.given,
        "national_id": registration.national_id,
        "phones": list(registration.phones),
        "line": registration.address_line,
        "identifiers": [[i.system, i.value, i.type] for i in registration.identifiers],
    }


def sealed_context(record_id: str) -> str:
    """The associated data of a record's sealed blob: a blob copied to another row fails to open."""
    return f"mpi.patient.sealed:{record_id}"


def sealed_sessions(sessions: async_sessionmaker[AsyncSession], protection: DataProtection) -> None:
    """Make a session factory's sessions open and seal the mpi's personal data."""
    info = dict(sessions.kw.get("info") or {})
    info[_SEALING] = RecordSealing(protection)
    sessions.configure(info=info)


def sealing_of(session: AsyncSession | Session) -> RecordSealing:
    sealing = session.info.get(_SEALING)
    if sealing is None:
        # A session from a factory nobody configured would write clear personal data: refuse.
        raise RuntimeError("this session cannot seal personal data (see store.sealed_sessions)")
    return sealing


def _set_opened(record: PatientRecord, opened: dict[str, Any]) -> None:
    record.name_text = opened["text"]
    record.family = opened["family"]
    record.given = opened["given"]
    record.national_id = opened["national_id"]
    record.phones = list(opened["phones"])
    record.address_line = opened["line"]
    record.identifiers = [Identifier(system=s, value=v, type=t) for s, v, t in opened["identifiers"]]


def _open_stored(record: PatientRecord, session: Session) -> None:
    _set_opened(record, sealing_of(session).open(record.id, record.sealed))


@event.listens_for(PatientRecord, "load")
def _open_on_load(record: PatientRecord, context: QueryContext) -> None:
    _open_stored(record, context.session)


@event.listens_for(PatientRecord, "refresh")
def _open_on_refresh(record: PatientRecord, context: QueryContext, attrs: Any) -> None:
    if attrs is None or "sealed" in attrs:
        _open_stored(record, context.session)


async def find_record(session: AsyncSession, *, domain: str, local_id: str) -> PatientRecord | None:
    return await session.scalar(
        select(PatientRecord).where(PatientRecord.domain == domain, PatientRecord.local_id == local_id)
    )


def match_record_of(record: PatientRecord) -> MatchRecord:
    """The comparable form of a stored record."""
    return match_record(
        record_id=record.id,
        domain=record.domain,
        enterprise_id=record.enterprise_id,
        name_text=record.name_text,
        family=record.family,
        given=record.given,
        gender=record.gender,
        birth_date=record.birth_date,
        national_id=record.national_id,
        phones=record.phones,
        province=record.province,
        city=record.city,
        district=record.district,
        address_line=record.address_line,
        postal_code=record.postal_code,
        identifiers=[(i.system, i.value) for i in record.identifiers],
    )


def match_record_of_row(row: Mapping[str, Any], sealing: RecordSealing) -> MatchRecord:
    """The comparable form of a `patient` row read with Core (no ORM object): its sealed part
    opened here."""
    opened = sealing.open(row["id"], row["sealed"])
    return match_record(
        record_id=row["id"],
        domain=row["domain"],
        enterprise_id=row["enterprise_id"],
        name_text=opened["text"],
        family=opened["family"],
        given=opened["given"],
        gender=row["gender"],
        birth_date=row["birth_date"],
        national_id=opened["national_id"],
        phones=opened["phones"],
        province=row["province"],
        city=row["city"],
        district=row["district"],
        address_line=opened["line"],
        postal_code=row["postal_code"],
        identifiers=[(system, value) for system, value, _ in opened["identifiers"]],
    )


def match_record_of_registration(registration: Registration, *, record_id: str, enterprise_id: str) -> MatchRecord:
    """The comparable form of a registration before (or instead of) storing it."""
    return match_record(
        record_id=record_id,
        domain=registration.domain,
        enterprise_id=enterprise_id,
        name_text=registration.name_text,
        family=registration.family,
        given=registration.given,
        gender=registration.gender.value,
        birth_date=registration.birth_date,
        national_id=registration.national_id,
        phones=registration.phones,
        province=registration.province,
        city=registration.city,
        district=registration.district,
        address_line=registration.address_line,
        postal_code=registration.postal_code,
        identifiers=[(i.system, i.value) for i in registration.identifiers],
    )


async def candidates(session: AsyncSession, keys: set[str], *, limit: int = 500) -> list[PatientRecord]:
    """Active records filed under any of the keys: an index lookup on blocking_key, never a scan."""
    if not keys:
        return []
    sealing = sealing_of(session)
    digests = sorted({sealing.key(k) for k in keys})
    ids = select(BlockingKey.patient_id).where(BlockingKey.key.in_(digests)).distinct().limit(limit)
    rows = await session.scalars(
        select(PatientRecord).where(PatientRecord.id.in_(ids), PatientRecord.merged_into.is_(None))
    )
    return list(rows)


async def set_blocking_keys(session: AsyncSession, patient_id: str, keys: set[str], *, new: bool = False) -> None:
    """Replace a record's blocking keys (none for a retired record)."""
    if not new:
        await session.execute(delete(BlockingKey).where(BlockingKey.patient_id == patient_id))
    if keys:
        sealing = sealing_of(session)
        digests = sorted({sealing.key(k) for k in keys})
        await session.execute(insert(BlockingKey), [{"key": d, "patient_id": patient_id} for d in digests])


async def adjust_frequencies(session: AsyncSession, values: dict[str, str], delta: int) -> None:
    """Count a record's name values in (delta 1) or out (delta -1) of the frequency table."""
    sealing = sealing_of(session)
    rows = [{"field": f, "value": sealing.name_value(f, v), "count": delta} for f, v in values.items() if v]
    rows += [{"field": f, "value": "", "count": delta} for f, v in values.items() if v]
    if not rows:
        return
    dialect_insert = pg_insert if session.bind.dialect.name == "postgresql" else sqlite_insert
    statement = dialect_insert(NameFrequency)
    statement = statement.on_conflict_do_update(
        index_elements=["field", "value"], set_={"count": NameFrequency.count + statement.excluded.count}
    )
    await session.execute(statement, sorted(rows, key=lambda r: (r["field"], r["value"])))


async def value_frequencies(session: AsyncSession, values: dict[str, str]) -> ValueFrequencies:
    """The counts of these name values and the totals of their fields."""
    if not values:
        return ValueFrequencies()
    return await frequencies_of(session, {(f, v) for f, v in values.items() if v}, fields=set(values))


async def different_from(session: AsyncSession, patient_id: str) -> frozenset[str]:
    """Records a data steward declared a different person from this one."""
    rows = await session.execute(
        select(NonMatch.patient_a, NonMatch.patient_b).where(
            or_(NonMatch.patient_a == patient_id, NonMatch.patient_b == patient_id)
        )
    )
    return frozenset(b if a == patient_id else a for a, b in rows)


async def record_non_match(session: AsyncSession, a: str, b: str, *, decided_by: str) -> None:
    first, second = sorted((a, b))
    existing = await session.get(NonMatch, (first, second))
    if existing is None:
        session.add(NonMatch(patient_a=first, patient_b=second, decided_by=decided_by[:64], created_at=utcnow()))
        await session.flush()


def _apply(session: AsyncSession, record: PatientRecord, registration: Registration) -> None:
    sealing_of(session).apply(record, registration)
    record.gender = registration.gender.value
    record.birth_date = registration.birth_date
    record.province = registration.province
    record.city = registration.city
    record.district = registration.district
    record.postal_code = registration.postal_code
    record.updated_at = utcnow()


async def _write_identifiers(session: AsyncSession, record_id: str, registration: Registration, *, new: bool) -> None:
    if not new:
        await session.execute(delete(IdentifierRecord).where(IdentifierRecord.patient_id == record_id))
    rows = sealing_of(session).identifier_rows(record_id, registration)
    if rows:
        await session.execute(insert(IdentifierRecord), rows)


async def insert_record(
    session: AsyncSession,
    registration: Registration,
    *,
    record_id: str,
    enterprise_id: str,
    method: str,
    score: float | None,
    decided_by: str,
) -> PatientRecord:
    """Store a new record with its first link and the history row of it."""
    now = utcnow()
    record = PatientRecord(
        id=record_id,
        domain=registration.domain,
        local_id=registration.local_id,
        enterprise_id=enterprise_id,
        link_method=method,
        link_score=score,
        linked_at=now,
        created_at=now,
    )
    _apply(session, record, registration)
    session.add(record)
    await session.flush()  # the patient row first: history and identifiers refer to it
    await _write_identifiers(session, record.id, registration, new=True)
    session.add(
        LinkHistory(
            patient_id=record.id,
            enterprise_id=enterprise_id,
            method=method,
            decided_by=decided_by[:64],
            created_at=now,
            score=score,
            reason="register",
        )
    )
    await session.flush()
    return record


async def update_record(session: AsyncSession, record: PatientRecord, registration: Registration) -> PatientRecord:
    _apply(session, record, registration)
    await session.flush()
    await _write_identifiers(session, record.id, registration, new=False)
    return record


async def move_record(
    session: AsyncSession,
    record: PatientRecord,
    *,
    enterprise_id: str,
    method: str,
    score: float | None,
    decided_by: str,
    reason: str,
) -> str:
    """Give a record another enterprise id, with a history row; returns the previous one."""
    previous = record.enterprise_id
    now = utcnow()
    record.enterprise_id = enterprise_id
    record.link_method = method
    record.link_score = score
    record.linked_at = now
    session.add(
        LinkHistory(
            patient_id=record.id,
            enterprise_id=enterprise_id,
            previous_enterprise_id=previous,
            method=method,
            decided_by=decided_by[:64],
            created_at=now,
            score=score,
            reason=reason,
        )
    )
    await session.flush()
    return previous


async def records_of_person(session: AsyncSession, enterprise_id: str) -> list[PatientRecord]:
    """The active records of one enterprise id, oldest first."""
    rows = await session.scalars(
        select(PatientRecord)
        .where(PatientRecord.enterprise_id == enterprise_id, PatientRecord.merged_into.is_(None))
        .order_by(PatientRecord.created_at)
    )
    return list(rows)


async def records_by_id(session: AsyncSession, ids: list[str]) -> dict[str, PatientRecord]:
    rows = await session.scalars(select(PatientRecord).where(PatientRecord.id.in_(ids)))
    return {r.id: r for r in rows}


def record_identifiers(record: PatientRecord) -> list[Identifier]:
    return list(record.identifiers)


async def add_review_task(
    session: AsyncSession, *, patient_id: str, candidate_id: str, score: float, comparison: str, hold: str
) -> str | None:
    """Open a review task for a pair unless one is already open (either way round)."""
    existing = await session.scalar(
        select(ReviewTask.id).where(
            ReviewTask.status == "open",
            or_(
                and_(ReviewTask.patient_id == patient_id, ReviewTask.candidate_id == candidate_id),
                and_(ReviewTask.patient_id == candidate_id, ReviewTask.candidate_id == patient_id),
            ),
        )
    )
    if existing is not None:
        return None
    task_id = str(uuid.uuid4())
    session.add(
        ReviewTask(
            id=task_id,
            patient_id=patient_id,
            candidate_id=candidate_id,
            score=score,
            comparison=comparison,
            hold=hold,
            status="open",
            created_at=utcnow(),
        )
    )
    await session.flush()
    return task_id


async def open_review_tasks(
    session: AsyncSession, *, limit: int, after: datetime.datetime | None, domain: str | None = None
) -> list[ReviewTask]:
    """Open tasks oldest first (a domain: tasks with a record of that domain on either side)."""
    query = select(ReviewTask).where(ReviewTask.status == "open")
    if after is not None:
        query = query.where(ReviewTask.created_at > after)
    if domain is not None:
        mine = select(PatientRecord.id).where(PatientRecord.domain == domain)
        query = query.where(or_(ReviewTask.patient_id.in_(mine), ReviewTask.candidate_id.in_(mine)))
    rows = await session.scalars(query.order_by(ReviewTask.created_at, ReviewTask.id).limit(limit))
    return list(rows)


async def review_task(session: AsyncSession, task_id: str, *, for_update: bool = False) -> ReviewTask | None:
    query = select(ReviewTask).where(ReviewTask.id == task_id)
    if for_update and session.bind.dialect.name == "postgresql":
        query = query.with_for_update()
    return await session.scalar(query)


async def close_settled_tasks(session: AsyncSession, patient_ids: list[str]) -> None:
    """Close open tasks whose two records now share an enterprise id (settled another way)."""
    tasks = await session.scalars(
        select(ReviewTask).where(
            ReviewTask.status == "open",
            or_(ReviewTask.patient_id.in_(patient_ids), ReviewTask.candidate_id.in_(patient_ids)),
        )
    )
    tasks = list(tasks)
    if not tasks:
        return
    records = await records_by_id(session, [t.patient_id for t in tasks] + [t.candidate_id for t in tasks])
    for task in tasks:
        a, b = records.get(task.patient_id), records.get(task.candidate_id)
        if a is not None and b is not None and a.enterprise_id == b.enterprise_id:
            task.status = "closed"
            task.decided_at = utcnow()
            task.decided_by = "settled"
    await session.flush()


async def link_history(session: AsyncSession, patient_ids: list[str]) -> list[LinkHistory]:
    rows = await session.scalars(
        select(LinkHistory).where(LinkHistory.patient_id.in_(patient_ids)).order_by(LinkHistory.id)
    )
    return list(rows)


async def add_merge(
    session: AsyncSession, *, domain: str, survivor_id: str, subsumed_id: str, moved: str, decided_by: str
) -> str:
    merge_id = str(uuid.uuid4())
    session.add(
        MergeRecord(
            id=merge_id,
            domain=domain,
            survivor_id=survivor_id,
            subsumed_id=subsumed_id,
            moved=moved,
            created_at=utcnow(),
            decided_by=decided_by[:64],
        )
    )
    await session.flush()
    return merge_id


async def last_merge_of(session: AsyncSession, subsumed_id: str) -> MergeRecord | None:
    return await session.scalar(
        select(MergeRecord)
        .where(MergeRecord.subsumed_id == subsumed_id, MergeRecord.undone_at.is_(None))
        .order_by(MergeRecord.created_at.desc())
    )


async def all_links(session: AsyncSession, *, batch: int = 5000) -> AsyncIterator[Row[Any]]:
    """(domain, local_id, enterprise_id, link_method) of every active record, in pages."""
    last = ("", "")
    while True:
        rows = (
            await session.execute(
                select(
                    PatientRecord.domain, PatientRecord.local_id, PatientRecord.enterprise_id, PatientRecord.link_method
                )
                .where(
                    PatientRecord.merged_into.is_(None),
                    tuple_(PatientRecord.domain, PatientRecord.local_id) > last,
                )
                .order_by(PatientRecord.domain, PatientRecord.local_id)
                .limit(batch)
            )
        ).all()
        if not rows:
            return
        for row in rows:
            yield row
        last = (rows[-1].domain, rows[-1].local_id)


async def inbound_message(session: AsyncSession, facility: str, control_id: str) -> InboundMessage | None:
    return await session.get(InboundMessage, (facility, control_id))


async def add_inbound_message(
    session: AsyncSession, facility: str, control_id: str, *, ack_code: str, reason: str, digest: str = ""
) -> None:
    session.add(
        InboundMessage(
            facility=facility,
            control_id=control_id,
            ack_code=ack_code,
            reason=reason[:64],
            received_at=utcnow(),
            digest=digest,
        )
    )
    await session.flush()


async def bulk_load(session: AsyncSession, load_id: str) -> BulkLoad | None:
    return await session.get(BulkLoad, load_id)


async def save_bulk_load(session: AsyncSession, load_id: str, *, domain: str, rows_done: int, counts: str) -> None:
    row = await session.get(BulkLoad, load_id)
    if row is None:
        session.add(BulkLoad(id=load_id, domain=domain, rows_done=rows_done, counts=counts, updated_at=utcnow()))
    else:
        row.rows_done, row.counts, row.updated_at = rows_done, counts, utcnow()
    await session.flush()


async def record_by_id(session: AsyncSession, record_id: str) -> PatientRecord | None:
    return await session.get(PatientRecord, record_id)


@dataclasses.dataclass(frozen=True)
class RecordIdentity:
    """Who a record is, without its sealed demographics: what cross-referencing needs."""

    id: str
    domain: str
    local_id: str
    enterprise_id: str
    merged_into: str | None


def _identity_select() -> Any:
    p = PatientRecord.__table__.c
    return select(p.id, p.domain, p.local_id, p.enterprise_id, p.merged_into)


def _person_statement(*, follow_merges: bool) -> Any:
    """One statement for the common case: the active records of the person whose active record
    (domain, local id) names, oldest first, then (with `follow_merges`) every record merged away
    into them, recursively. No rows when the named record is absent or itself merged away."""
    t = PatientRecord.__table__
    named = (
        select(t.c.enterprise_id)
        .where(t.c.domain == bindparam("domain"), t.c.local_id == bindparam("local_id"), t.c.merged_into.is_(None))
        .scalar_subquery()
    )
    columns = (t.c.id, t.c.domain, t.c.local_id, t.c.enterprise_id, t.c.merged_into, t.c.created_at)
    active = select(*columns, literal(0).label("depth")).where(t.c.enterprise_id == named, t.c.merged_into.is_(None))
    if not follow_merges:
        return active.order_by(t.c.created_at)
    person = active.cte("person", recursive=True)
    retired = t.alias("retired")
    person = person.union_all(
        select(
            retired.c.id,
            retired.c.domain,
            retired.c.local_id,
            retired.c.enterprise_id,
            retired.c.merged_into,
            retired.c.created_at,
            person.c.depth + 1,
        ).where(retired.c.merged_into == person.c.id)
    )
    return select(person).order_by(person.c.depth, person.c.created_at)


_PERSON = {follow: _person_statement(follow_merges=follow) for follow in (False, True)}


async def person_identities(
    db: AsyncSession | AsyncConnection, *, domain: str, local_id: str, follow_merges: bool
) -> tuple[RecordIdentity, list[RecordIdentity]] | None:
    """The record (domain, local id) names, or with `follow_merges` the survivor a merge retired it
    into, and every active record of its person, oldest first, with `follow_merges` followed by the
    records merged away into them. Column reads only: nothing is decrypted, as nothing sealed is
    needed to say which ids belong together. None if there is no such (active) record.

    One statement when the named record is active (every cross-reference but a merged-away
    record's), so a caller may run it outside a transaction."""
    rows = await db.execute(_PERSON[follow_merges], {"domain": domain, "local_id": local_id})
    records = [RecordIdentity(*row[:5]) for row in rows]
    named = next((r for r in records if r.domain == domain and r.local_id == local_id), None)
    if named is not None:
        return named, records
    p = PatientRecord.__table__.c
    found = (await db.execute(_identity_select().where(p.domain == domain, p.local_id == local_id))).first()
    record = RecordIdentity(*found) if found else None
    while follow_merges and record is not None and record.merged_into is not None:
        found = (await db.execute(_identity_select().where(p.id == record.merged_into))).first()
        record = RecordIdentity(*found) if found else None
    if record is None or record.merged_into is not None:
        return None
    survivor_of_merge = await db.execute(_PERSON[follow_merges], {"domain": record.domain, "local_id": record.local_id})
    return record, [RecordIdentity(*row[:5]) for row in survivor_of_merge]


async def known_local_ids(session: AsyncSession, *, domain: str, local_ids: list[str]) -> set[str]:
    """Which of these local ids one domain has registered already."""
    if session.bind.dialect.name == "postgresql":
        # An array parameter, not an IN list rendered parameter by parameter (see match_candidates_by_key).
        found = await session.scalars(_KNOWN_LOCAL_IDS, {"domain": domain, "local_ids": local_ids})
        return set(found)
    rows = await session.scalars(
        select(PatientRecord.local_id).where(PatientRecord.domain == domain, PatientRecord.local_id.in_(local_ids))
    )
    return set(rows)


async def frequencies_of(
    session: AsyncSession, values: set[tuple[str, str]], *, fields: set[str] | None = None
) -> ValueFrequencies:
    """Counts of many name values (and their fields' totals) in one query per chunk."""
    sealing = sealing_of(session)
    clear_of = {(f, sealing.name_value(f, v)): (f, v) for f, v in values}
    by_field: dict[str, list[str]] = {f: [""] for f in (fields or set()) | {f for f, _ in values}}
    for f, digest in clear_of:
        by_field[f].append(digest)
    if not by_field:
        # Nothing to count (a bulk batch of updates only). An empty OR would select every row
        # (SQLAlchemy renders or_() as no condition), names of other records included.
        return ValueFrequencies()
    counts: dict[tuple[str, str], int] = {}
    totals: dict[str, int] = {}
    results = []
    if session.bind.dialect.name == "postgresql":
        # Two arrays joined by the primary key, not IN lists (see match_candidates_by_key).
        pairs = [(f, d) for f, digests in sorted(by_field.items()) for d in digests]
        results.append(
            await session.execute(_NAME_COUNTS, {"fields": [f for f, _ in pairs], "values": [d for _, d in pairs]})
        )
    else:
        # Each condition is (field = f AND value IN (…)) on the (field, value) primary key. A single
        # registration's few values go in one query (an OR of the fields: one index scan each); a
        # bulk batch's go one query per field, chunked for SQLite's parameter limit.
        if sum(len(d) for d in by_field.values()) <= 900:
            chunks = [[(f, d) for f, d in sorted(by_field.items())]]
        else:
            chunks = [
                [(f, digests[start : start + 900])]
                for f, digests in sorted(by_field.items())
                for start in range(0, len(digests), 900)
            ]
        for chunk in chunks:
            results.append(
                await session.execute(
                    select(NameFrequency.field, NameFrequency.value, NameFrequency.count).where(
                        or_(*(and_(NameFrequency.field == f, NameFrequency.value.in_(d)) for f, d in chunk))
                    )
                )
            )
    for rows in results:
        for field_name, value, count in rows:
            if value == "":
                totals[field_name] = count
            else:
                counts[clear_of[(field_name, value)]] = count
    return ValueFrequencies(counts=counts, totals=totals)


async def add_frequency_deltas(session: AsyncSession, deltas: dict[tuple[str, str], int]) -> None:
    """Add counts per (field, name value); value "" is the field's total."""
    sealing = sealing_of(session)
    rows = [{"field": f, "value": sealing.name_value(f, v), "count": d} for (f, v), d in sorted(deltas.items()) if d]
    if not rows:
        return
    dialect_insert = pg_insert if session.bind.dialect.name == "postgresql" else sqlite_insert
    statement = dialect_insert(NameFrequency)
    statement = statement.on_conflict_do_update(
        index_elements=["field", "value"], set_={"count": NameFrequency.count + statement.excluded.count}
    )
    await session.execute(statement, rows)


async def insert_rows(session: AsyncSession, table: Table, rows: list[dict[str, Any]]) -> None:
    """Insert many rows (same keys each) into one of the mpi's tables, in the session's
    transaction: COPY on PostgreSQL (a bulk batch writes thousands of rows; COPY costs a fraction
    of INSERT's per-row protocol and planning), one executemany elsewhere."""
    if not rows:
        return
    if session.bind.dialect.name != "postgresql":
        await session.execute(insert(table), rows)
        return
    columns = list(rows[0])
    connection = await session.connection()
    raw = await connection.get_raw_connection()
    # Unqualified: the component's schema is the connection's search_path.
    await raw.driver_connection.copy_records_to_table(  # type: ignore[union-attr]
        table.name, records=[tuple(row[c] for c in columns) for row in rows], columns=columns
    )


_KNOWN_LOCAL_IDS = text(
    "SELECT p.local_id FROM unnest(CAST(:local_ids AS varchar[])) AS l(local_id) "
    "JOIN patient AS p ON p.domain = :domain AND p.local_id = l.local_id"
)
_NAME_COUNTS = text(
    "SELECT n.field, n.value, n.count FROM unnest(CAST(:fields AS varchar[]), CAST(:values AS varchar[])) "
    "AS q(field, value) JOIN name_frequency AS n ON n.field = q.field AND n.value = q.value"
)
# Records read per blocking key at most: scoring stops at 500 candidates anyway, and the name-only
# block of a common name (read for records without a birth date) grows with the region.
BLOCK_READ_LIMIT = 501
_KEYED_PAIRS = text(
    "SELECT k.key, b.patient_id FROM unnest(CAST(:keys AS varchar[])) AS k(key) CROSS JOIN LATERAL "
    "(SELECT patient_id FROM blocking_key WHERE key = k.key ORDER BY patient_id LIMIT :per_key) AS b"
)
_ACTIVE_PATIENTS = text(
    "SELECT p.id, p.domain, p.enterprise_id, p.sealed, p.gender, p.birth_date, p.province, p.city, "
    "p.district, p.postal_code FROM unnest(CAST(:ids AS varchar[])) AS i(id) "
    "JOIN patient AS p ON p.id = i.id WHERE p.merged_into IS NULL"
)


async def match_candidates_by_key(
    session: AsyncSession, keys: set[str], *, digests: dict[str, str] | None = None, chunk: int = 900
) -> dict[str, list[MatchRecord]]:
    """Active records filed under each of these blocking keys, straight to comparable records
    (Core rows, no ORM objects: the bulk path reads thousands per batch). `digests`: the keys'
    blind indexes if the caller has them already."""
    sealing = sealing_of(session)
    patient = PatientRecord.__table__
    clear_of = {(digests or {}).get(k) or sealing.key(k): k for k in keys}
    ordered = sorted(clear_of)
    pairs: list[tuple[str, str]] = []
    records: dict[str, MatchRecord] = {}
    if session.bind.dialect.name == "postgresql":
        # One array parameter joined by index, not an IN list: SQLAlchemy renders an IN list
        # parameter by parameter, which took 30 % of a bulk load's time at 500k records.
        rows = await session.execute(_KEYED_PAIRS, {"keys": ordered, "per_key": BLOCK_READ_LIMIT})
        pairs = [(clear_of[k], p) for k, p in rows]
        ids = sorted({p for _, p in pairs})
        rows = await session.execute(_ACTIVE_PATIENTS, {"ids": ids})
        for row in rows.mappings():
            records[row["id"]] = match_record_of_row(row, sealing)
    else:
        for start in range(0, len(ordered), chunk):
            rows = await session.execute(
                select(BlockingKey.key, BlockingKey.patient_id).where(
                    BlockingKey.key.in_(ordered[start : start + chunk])
                )
            )
            pairs.extend((clear_of[k], p) for k, p in rows)
        # As on PostgreSQL: at most BLOCK_READ_LIMIT records per key, in index order.
        per_key: dict[str, int] = {}
        capped = []
        for key, patient_id in sorted(pairs):
            per_key[key] = per_key.get(key, 0) + 1
            if per_key[key] <= BLOCK_READ_LIMIT:
                capped.append((key, patient_id))
        pairs = capped
        ids = sorted({p for _, p in pairs})
        for start in range(0, len(ids), chunk):
            part = ids[start : start + chunk]
            rows = await session.execute(select(patient).where(patient.c.id.in_(part), patient.c.merged_into.is_(None)))
            for row in rows.mappings():
                records[row["id"]] = match_record_of_row(row, sealing)
    by_key: dict[str, list[MatchRecord]] = {}
    for key, patient_id in pairs:
        if patient_id in records:
            by_key.setdefault(key, []).append(records[patient_id])
    return by_key


async def save_estimate(
    session: AsyncSession,
    *,
    source: str,
    records: int,
    candidate_pairs: int,
    random_pairs: int,
    parameters: Mapping[str, Any],
) -> MatchEstimate:
    """Store an EM estimate (it is in force from now on for indexes that use estimates)."""
    row = MatchEstimate(
        estimated_at=utcnow(),
        source=source,
        records=records,
        candidate_pairs=candidate_pairs,
        random_pairs=random_pairs,
        parameters=json.dumps(parameters, sort_keys=True),
    )
    session.add(row)
    await session.flush()
    return row


async def latest_estimate(session: AsyncSession) -> MatchEstimate | None:
    """The estimate in force: the latest stored one, or None (the shipped priors: a cold start)."""
    return await session.scalar(select(MatchEstimate).order_by(MatchEstimate.id.desc()).limit(1))


async def random_records(session: AsyncSession, count: int) -> list[PatientRecord]:
    """Up to `count` active records drawn at random (the u-probabilities' sample)."""
    ids = list(
        await session.scalars(
            select(PatientRecord.id).where(PatientRecord.merged_into.is_(None)).order_by(func.random()).limit(count)
        )
    )
    return list((await records_by_id(session, ids)).values())


async def active_count(session: AsyncSession) -> int:
    """Active (not merged-away) records in the index."""
    return int(
        await session.scalar(select(func.count()).select_from(PatientRecord).where(PatientRecord.merged_into.is_(None)))
        or 0
    )
