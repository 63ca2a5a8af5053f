"""The mpi's queries: every read and write of its tables (tables.py), with personal data sealed
on the way in and opened on the way out (sealing.py).

Personal data is never stored in clear. Birth date, gender and the address down to the district
stay in clear: the blocking keys and the masking policy's district level need them, and they
identify no one on their own.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from typing import Any

from sqlalchemy import (
    Row,
    Table,
    and_,
    bindparam,
    delete,
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
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from services.mpi.domain import Registration
from services.mpi.matching import MatchRecord, ValueFrequencies

# (`as` re-exports: index.py, bulk.py, estimation.py, bench.py and standalone.py still reach these
# through `store`.)
from services.mpi.records import match_record_of as match_record_of
from services.mpi.records import match_record_of_registration as match_record_of_registration
from services.mpi.records import match_record_of_row
from services.mpi.sealing import RecordSealing, sealing_of
from services.mpi.sealing import sealed_sessions as sealed_sessions
from services.mpi.tables import (
    BlockingKey,
    BulkLoad,
    IdentifierRecord,
    InboundMessage,
    LinkHistory,
    MatchEstimate,
    MergeRecord,
    NameFrequency,
    NonMatch,
    PatientRecord,
    ReviewTask,
)
from services.mpi.tables import metadata as metadata
from services.shared.db import utcnow


async def find_record(session: AsyncSession, *, domain: str, local_id: str) -> PatientRecord | None:
    return await session.scalar(
        select(PatientRecord).where(PatientRecord.domain == domain, PatientRecord.local_id == local_id)
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


class DecodedRecords:
    """Comparable records a bulk load has already built from `patient` rows, by record id, so a
    record read again by a later batch (a member of a block many new records share) is not
    opened and normalised again: building them was a fifth of a load's time at 150k records on
    PostgreSQL and grew with the index (a block's members are read by every batch with a record
    in it; py-spy, `hie bench mpi --records 200000`).

    An entry is used only while the row is as it was when built: its sealed blob and clear
    columns are compared with the row read now (an updated record is re-sealed, with a fresh
    nonce), and the enterprise id is taken from the row (a record moved by a link decision).
    At most `limit` records are kept, the least recently read dropped first."""

    # Each entry holds a comparable record and its row's sealed blob, ~3 kB: up to ~3 GB at the
    # default, which keeps every record of a 1M-record load (with a smaller limit the records
    # read least recently are built again when read again: at a quarter of the index, 40 % of
    # the records a 200k load reads near its end).
    DEFAULT_LIMIT = 1_000_000
    _STAMP = ("sealed", "domain", "gender", "birth_date", "province", "city", "district", "postal_code")

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit
        self._entries: OrderedDict[str, tuple[tuple[Any, ...], MatchRecord]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def remember(self, row: Mapping[str, Any], record: MatchRecord) -> None:
        """Keep the comparable form of a record the load writes (`row`, as written), so a later
        batch that reads the row does not open it again. `record` must be what
        `match_record_of_row` builds from the row (`match_record_of_registration` of the
        registration the row seals, with the row's enterprise id)."""
        entries = self._entries
        if record.record_id not in entries and len(entries) >= self.limit:
            entries.popitem(last=False)  # the least recently read
        entries[record.record_id] = (tuple(row[c] for c in self._STAMP), record)

    def record_of(self, row: Mapping[str, Any], sealing: RecordSealing) -> MatchRecord:
        """The comparable form of a `patient` row (as `match_record_of_row`), built once per
        row content."""
        record_id = row["id"]
        stamp = tuple(row[c] for c in self._STAMP)
        entries = self._entries
        entry = entries.get(record_id)
        if entry is not None:
            entries.move_to_end(record_id)
            if entry[0] == stamp:
                self.hits += 1
                record = entry[1]
                if record.enterprise_id != row["enterprise_id"]:
                    record = dataclasses.replace(record, enterprise_id=row["enterprise_id"])
                    entries[record_id] = (stamp, record)
                return record
        elif len(entries) >= self.limit:
            entries.popitem(last=False)  # the least recently read
        self.misses += 1
        record = match_record_of_row(row, sealing)
        entries[record_id] = (stamp, record)
        return record


async def match_candidates_by_key(
    session: AsyncSession,
    keys: set[str],
    *,
    digests: dict[str, str] | None = None,
    chunk: int = 900,
    decoded: DecodedRecords | None = None,
) -> dict[str, list[MatchRecord]]:
    """Active records filed under each of these blocking keys, straight to comparable records
    (Core rows, no ORM objects: the bulk path reads thousands per batch). `digests`: the keys'
    blind indexes if the caller has them already; `decoded`: records built by earlier batches
    of a load (reused while their rows are unchanged)."""
    build = match_record_of_row if decoded is None else decoded.record_of
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
            records[row["id"]] = build(row, sealing)
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
                records[row["id"]] = build(row, sealing)
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
