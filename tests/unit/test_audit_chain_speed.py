"""The audit chain's fast verification path gives the same bytes, hashes and verdicts as the
definition (chain.canonical, and the walk as first written), and the store reads records back
as the typed columns would."""

from __future__ import annotations

import datetime
import hashlib
import os
import secrets
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import insert, select, text, update

from services.audit import chain, store
from services.audit.chain import (
    CHAINED_FIELDS,
    GENESIS_HASH,
    SORTED_FIELDS,
    STORED_FIELDS,
    ChainVerdict,
    ChainWalk,
    StoredRecord,
    canonical,
    link_hash,
)
from services.shared.db import create_engine, ensure_schema, session_factory

UTC = datetime.UTC
CST = datetime.timezone(datetime.timedelta(hours=8))
N = 12
NAMES = ["张伟", "欧阳娜娜", "李娜", "司马相如", "王芳"]
DEPARTMENTS = ["心血管内科", "神经内科", "急诊科", "放射科", "医政医管处"]
POSTGRES_URL = os.environ.get("HIE_TEST_DATABASE_URL", "")


# --- the definition, as first written ---------------------------------------------------------


def reference_link(previous_hash: str, record: Mapping[str, Any]) -> str:
    return hashlib.sha256(previous_hash.encode("ascii") + b"\n" + canonical(record)).hexdigest()


def reference_verify(records: Iterable[Mapping[str, Any]]) -> ChainVerdict:
    """ChainWalk before the fast path: name lookups and canonical() for every record."""
    previous, expected, checked = GENESIS_HASH, 1, 0
    for record in records:
        sequence = record["sequence"]
        if sequence != expected:
            return ChainVerdict(False, checked, expected, "a record is missing from the sequence")
        if record["previous_hash"] != previous:
            return ChainVerdict(False, checked, sequence, "previous hash does not match the preceding record")
        if reference_link(previous, record) != record["hash"]:
            return ChainVerdict(False, checked, sequence, "record content does not match its hash")
        previous, expected, checked = record["hash"], expected + 1, checked + 1
    return ChainVerdict(True, checked)


# --- records ----------------------------------------------------------------------------------


def record(sequence: int) -> dict[str, Any]:
    """A record as the servicer stores it (times as aware UTC datetimes)."""
    occurred = datetime.datetime(2025, 3, 1, 8, 0, tzinfo=UTC) + datetime.timedelta(seconds=sequence * 7.123457)
    if sequence % 4 == 0:  # whole seconds: isoformat() writes no fraction
        occurred = occurred.replace(microsecond=0)
    return {
        "sequence": sequence,
        "event_id": str(uuid.UUID(int=sequence * 7919, version=4)),
        "occurred": occurred,
        "recorded": occurred + datetime.timedelta(microseconds=250_001),
        "type": "document.retrieve",
        "action": 2,
        "outcome": 1 if sequence % 5 else 2,
        "organization_id": "110105-chaoyang-hospital",
        "organization_type": "hospital",
        "client_id": "client-北京市朝阳医院",
        "practitioner_id": f"D{sequence:05d}",
        "practitioner_name": NAMES[sequence % len(NAMES)],
        "role": "doctor",
        "department": DEPARTMENTS[sequence % len(DEPARTMENTS)],
        "purpose_of_use": "treatment",
        "patient_enterprise_id": str(uuid.UUID(int=sequence, version=4)),
        "entities": store.entities_json([("DocumentReference", f"doc-{sequence}"), ("Patient", "出院小结")]),
        "source_address": "10.0.3.17",
        "trace_id": f"{sequence:032x}",
        "span_id": f"{sequence:016x}",
        "source_service": "registry",
    }


def seal(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    previous = GENESIS_HASH
    for rec in records:
        rec["previous_hash"] = previous
        rec["hash"] = previous = reference_link(previous, rec)
    return records


def stored(rec: Mapping[str, Any], *, times: str) -> StoredRecord:
    """As the store hands records to the walk: times as datetimes (PostgreSQL) or as their
    isoformat() text (SQLite)."""
    values = [rec[name] for name in STORED_FIELDS]
    if times == "text":
        values = [v.isoformat() if isinstance(v, datetime.datetime) else v for v in values]
    return StoredRecord(values)


FORMS = {
    "mapping": lambda rec: dict(rec),
    "stored-datetimes": lambda rec: stored(rec, times="datetime"),
    "stored-text": lambda rec: stored(rec, times="text"),
}


@pytest.fixture
def sealed() -> list[dict[str, Any]]:
    return seal([record(s) for s in range(1, N + 1)])


def altered(value: Any) -> Any:
    if isinstance(value, int):
        return value + 100
    if isinstance(value, datetime.datetime):
        return value + datetime.timedelta(microseconds=1)
    return value + "改"


# --- canonical bytes --------------------------------------------------------------------------


def test_the_fast_path_knows_the_field_order() -> None:
    assert sorted(CHAINED_FIELDS) == list(SORTED_FIELDS)
    assert ("previous_hash", "hash", *SORTED_FIELDS) == STORED_FIELDS


@pytest.mark.parametrize("sequence", range(1, N + 1))
def test_fast_canonical_is_byte_identical(sequence: int) -> None:
    rec = {**record(sequence), "previous_hash": "e" * 64, "hash": "f" * 64}
    expected = canonical(rec)
    for form in FORMS.values():
        converted = form(rec)
        values = tuple(converted[name] for name in SORTED_FIELDS)
        assert chain._fast_canonical(values) == expected
        assert chain._stored_canonical(values) == expected


ESCAPES = ['say "hi"', "back\\slash", "line\nbreak", "tab\t", "\x00nul", "\x1f", "\x7f del", "\u2028", "😀", ""]


@pytest.mark.parametrize("value", ESCAPES)
@pytest.mark.parametrize("field", [f for f in SORTED_FIELDS if f not in {"action", "outcome", "sequence"}])
def test_fast_canonical_escapes_like_json(field: str, value: str) -> None:
    rec = {**record(3), field: value}
    values = tuple(rec[name] for name in SORTED_FIELDS)
    assert chain._fast_canonical(values) == canonical(rec)
    assert chain._stored_canonical(values) == canonical(rec)


class Text(str):
    def isoformat(self) -> str:
        return "not the text"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("action", True),
        ("action", 2.0),
        ("outcome", None),
        ("sequence", "3"),
        ("department", None),
        ("department", 5),
        ("occurred", None),
        ("occurred", datetime.date(2025, 3, 1)),
        ("entities", [{"type": "Patient", "id": "p-1"}]),
        ("practitioner_name", Text("张伟")),
    ],
)
def test_values_of_other_types_take_the_definition(field: str, value: Any) -> None:
    rec = {**seal([record(1)])[0], field: value}
    values = tuple(rec[name] for name in SORTED_FIELDS)
    assert chain._fast_canonical(values) is None
    assert link_hash(GENESIS_HASH, rec) == reference_link(GENESIS_HASH, rec)
    as_stored = StoredRecord(rec[name] for name in STORED_FIELDS)
    assert link_hash(GENESIS_HASH, as_stored) == reference_link(GENESIS_HASH, rec)
    assert ChainWalk().step(as_stored) is ChainWalk().step(rec) is (reference_verify([rec]).intact)
    if not isinstance(value, Text):  # no driver returns a str subclass
        assert chain._stored_canonical(values) in {None, canonical(rec)}


def test_values_json_cannot_write_fail_alike() -> None:
    rec = {**seal([record(1)])[0], "department": b"bytes"}
    with pytest.raises(TypeError):
        reference_link(GENESIS_HASH, rec)
    with pytest.raises(TypeError):
        ChainWalk().step(StoredRecord(rec[name] for name in STORED_FIELDS))


texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
integers = st.integers(min_value=-(2**70), max_value=2**70)
times = st.datetimes(timezones=st.sampled_from([None, UTC, CST])) | texts
INTEGER_FIELDS = {"action", "outcome", "sequence"}
TIME_FIELDS = {"occurred", "recorded"}


@settings(max_examples=300, deadline=None)
@given(
    st.fixed_dictionaries(
        {
            name: integers if name in INTEGER_FIELDS else times if name in TIME_FIELDS else texts
            for name in CHAINED_FIELDS
        }
    )
)
def test_fast_canonical_matches_the_definition_for_any_values(rec: dict[str, Any]) -> None:
    values = tuple(rec[name] for name in SORTED_FIELDS)
    assert chain._fast_canonical(values) == canonical(rec)
    assert chain._stored_canonical(values) == canonical(rec)
    assert link_hash("a" * 64, rec) == reference_link("a" * 64, rec)


anything = st.none() | st.booleans() | integers | st.floats(allow_nan=False) | texts | st.datetimes()


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({name: anything for name in CHAINED_FIELDS}))
def test_the_stored_path_matches_the_definition_for_any_driver_value(rec: dict[str, Any]) -> None:
    values = tuple(rec[name] for name in SORTED_FIELDS)
    fast = chain._stored_canonical(values)
    assert fast is None or fast == canonical(rec)
    as_stored = StoredRecord(["a" * 64, "b" * 64, *values])
    assert link_hash("a" * 64, as_stored) == reference_link("a" * 64, rec)


# --- verdicts ---------------------------------------------------------------------------------


def walk(records: Iterable[Mapping[str, Any]]) -> ChainVerdict:
    """How the servicer walks: step until the first False."""
    walker = ChainWalk()
    for rec in records:
        if not walker.step(rec):
            break
    return walker.verdict()


def check_same_verdict(records: list[dict[str, Any]], *, intact: bool) -> None:
    expected = reference_verify(records)
    assert expected.intact is intact
    for form in FORMS.values():
        converted = [form(rec) for rec in records]
        assert walk(converted) == expected
        assert chain.verify(converted) == expected


def test_intact_chain(sealed: list[dict[str, Any]]) -> None:
    check_same_verdict(sealed, intact=True)
    assert reference_verify(sealed).records_checked == N


def test_fast_link_hash_is_the_definition(sealed: list[dict[str, Any]]) -> None:
    for rec in sealed:
        for form in FORMS.values():
            assert link_hash(rec["previous_hash"], form(rec)) == rec["hash"]


@pytest.mark.parametrize("position", [0, N // 2, N - 1])
@pytest.mark.parametrize("field", CHAINED_FIELDS)
def test_altered_record(sealed: list[dict[str, Any]], field: str, position: int) -> None:
    sealed[position][field] = altered(sealed[position][field])
    check_same_verdict(sealed, intact=False)


@pytest.mark.parametrize("field", ["hash", "previous_hash"])
@pytest.mark.parametrize("position", [0, N // 2, N - 1])
def test_altered_hashes(sealed: list[dict[str, Any]], field: str, position: int) -> None:
    sealed[position][field] = hashlib.sha256(b"forged").hexdigest()
    check_same_verdict(sealed, intact=False)


def test_altered_and_resealed_record(sealed: list[dict[str, Any]]) -> None:
    rec = sealed[N // 2]
    rec["practitioner_name"] = "冒名顶替"
    rec["hash"] = reference_link(rec["previous_hash"], rec)
    check_same_verdict(sealed, intact=False)


@pytest.mark.parametrize("position", [0, N // 2, N - 1])
def test_removed_record(sealed: list[dict[str, Any]], position: int) -> None:
    del sealed[position]
    # Removing the last record leaves an intact (shorter) chain: checkpoints catch that.
    check_same_verdict(sealed, intact=position == N - 1)


def test_removed_and_renumbered(sealed: list[dict[str, Any]]) -> None:
    del sealed[N // 2]
    for number, rec in enumerate(sealed, start=1):
        rec["sequence"] = number
    check_same_verdict(sealed, intact=False)


@pytest.mark.parametrize(("i", "j"), [(0, 1), (2, 7), (N - 2, N - 1)])
def test_reordered_records(sealed: list[dict[str, Any]], i: int, j: int) -> None:
    sealed[i], sealed[j] = sealed[j], sealed[i]
    check_same_verdict(sealed, intact=False)


def test_swapped_contents_keeping_sequence_numbers(sealed: list[dict[str, Any]]) -> None:
    a, b = sealed[3], sealed[4]
    a["event_id"], b["event_id"] = b["event_id"], a["event_id"]
    check_same_verdict(sealed, intact=False)


def test_stored_record_reads_like_a_mapping(sealed: list[dict[str, Any]]) -> None:
    rec = stored(sealed[0], times="datetime")
    assert rec["sequence"] == 1 == rec[STORED_FIELDS.index("sequence")]
    assert rec["previous_hash"] == GENESIS_HASH == rec[0]
    assert rec["hash"] == sealed[0]["hash"]
    assert rec.as_mapping() == {name: sealed[0][name] for name in STORED_FIELDS}
    assert canonical(rec) == canonical(sealed[0])
    with pytest.raises(KeyError):
        rec["stored_at"]


# --- the store reads what the typed columns read ----------------------------------------------


def _backends() -> list[Any]:
    return [
        pytest.param("sqlite", id="sqlite"),
        pytest.param(
            "postgres",
            id="postgres",
            marks=pytest.mark.skipif(not POSTGRES_URL, reason="HIE_TEST_DATABASE_URL not set"),
        ),
    ]


@pytest.fixture(params=_backends())
async def audit_db(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Any]:
    if request.param == "postgres":
        schema = f"t{secrets.token_hex(3)}_audit_speed"
        engine = create_engine(POSTGRES_URL, schema=schema)
        await ensure_schema(engine, schema)
    else:
        schema = "audit"
        engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}", schema=schema)
    async with engine.begin() as conn:
        await conn.run_sync(store.metadata.create_all)
    try:
        yield engine
    finally:
        if request.param == "postgres":
            async with engine.begin() as conn:
                await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await engine.dispose()


async def _read_both(engine: Any) -> tuple[list[StoredRecord], list[dict[str, Any]]]:
    sessions = session_factory(engine)
    async with sessions() as session:
        fast = [rec async for rec in store.all_records(session, batch=5)]
    async with sessions() as session:
        typed = [r.as_mapping() for r in (await session.scalars(select(store.AuditRecord))).all()]
    typed.sort(key=lambda r: r["sequence"])
    return fast, typed


async def test_the_store_reads_what_the_typed_columns_read(audit_db: Any) -> None:
    records = seal([record(s) for s in range(1, N + 1)])
    table = store.AuditRecord.__table__
    async with audit_db.begin() as conn:
        await conn.execute(insert(table), records)
    fast, typed = await _read_both(audit_db)
    assert [r["sequence"] for r in fast] == list(range(1, N + 1))
    for got, want in zip(fast, typed, strict=True):
        assert type(got) is StoredRecord
        assert canonical(got) == canonical(want)
        assert chain._stored_canonical(got[2:]) == canonical(want)
    assert walk(fast) == reference_verify(typed) == ChainVerdict(True, N)

    # Tamper in the middle, as `hie bench audit` does, and with times written another way.
    async with audit_db.begin() as conn:
        await conn.execute(update(table).where(table.c.sequence == 6).values(practitioner_name="冒名顶替"))
        if audit_db.dialect.name == "sqlite":
            # Times SQLAlchemy would not write, but reads: another offset, no fraction.
            await conn.execute(text("UPDATE audit_record SET occurred = '2025-03-01T08:00:14+08:00' WHERE sequence=2"))
            await conn.execute(text("UPDATE audit_record SET recorded = '2025-03-01 08:00:15' WHERE sequence = 3"))
    fast, typed = await _read_both(audit_db)
    for got, want in zip(fast, typed, strict=True):
        assert canonical(got) == canonical(want)
        assert link_hash(want["previous_hash"], got) == reference_link(want["previous_hash"], want)
    assert walk(fast) == reference_verify(typed)
    assert walk(fast).first_break_sequence == (2 if audit_db.dialect.name == "sqlite" else 6)
