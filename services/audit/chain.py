"""The hash chain over audit records (pure: no I/O).

Each record's hash is SHA-256 over the previous record's hash and the record's canonical
content, so altering or removing any record breaks every hash after it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from json.encoder import encode_basestring
from operator import itemgetter
from typing import Any

GENESIS_HASH = "0" * 64
# The record fields the hash covers, in the stored form. Adding a field means a new chain version.
CHAINED_FIELDS = (
    "sequence",
    "event_id",
    "occurred",
    "recorded",
    "type",
    "action",
    "outcome",
    "organization_id",
    "organization_type",
    "client_id",
    "practitioner_id",
    "practitioner_name",
    "role",
    "department",
    "purpose_of_use",
    "patient_enterprise_id",
    "entities",
    "source_address",
    "trace_id",
    "span_id",
    "source_service",
)


def canonical(record: Mapping[str, Any]) -> bytes:
    """The bytes a record's hash covers: its chained fields as sorted, compact UTF-8 JSON.

    This is the definition; link_hash() and ChainWalk write the same bytes faster when the values
    are plain (_fast_canonical, _stored_canonical; tests/unit/test_audit_chain_speed.py)."""
    content = {name: _plain(record[name]) for name in CHAINED_FIELDS}
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _plain(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


# --- the fast path -----------------------------------------------------------------------------
# Verifying a million records must take seconds, so the hot path builds no dict and encodes no
# key per record: the chained values, in the order json.dumps(sort_keys=True) writes them, go
# into one f-string.

# The chained fields in the order canonical() writes them.
SORTED_FIELDS = tuple(sorted(CHAINED_FIELDS))
# How the verifier reads a stored record (see StoredRecord).
STORED_FIELDS = ("previous_hash", "hash", *SORTED_FIELDS)
_STORED_INDEX = {name: i for i, name in enumerate(STORED_FIELDS)}
_HEAD = slice(0, 2)
_VALUES = slice(2, None)
_SEQUENCE = SORTED_FIELDS.index("sequence")
_tuple_item = tuple.__getitem__
_sorted_values = itemgetter(*SORTED_FIELDS)


def _types(occurred: type, recorded: type) -> tuple[type, ...]:
    kinds = {"occurred": occurred, "recorded": recorded, "action": int, "outcome": int, "sequence": int}
    return tuple(kinds.get(name, str) for name in SORTED_FIELDS)


# The exact value types _fast_canonical handles: integers, text, and each of the two times as a
# datetime (as the store holds them) or as its isoformat() text (as StoredRecord may carry them).
_PLAIN_TYPES = frozenset(_types(o, r) for o in (str, datetime.datetime) for r in (str, datetime.datetime))
assert SORTED_FIELDS == (  # the order _stored_canonical unpacks
    "action", "client_id", "department", "entities", "event_id", "occurred", "organization_id",
    "organization_type", "outcome", "patient_enterprise_id", "practitioner_id", "practitioner_name",
    "purpose_of_use", "recorded", "role", "sequence", "source_address", "source_service", "span_id",
    "trace_id", "type",
)  # fmt: skip


def _fast_canonical(values: tuple[Any, ...]) -> bytes | None:
    """canonical() of the chained values given in SORTED_FIELDS order, byte for byte, or None when
    a value is not of a type handled here (the caller then uses canonical())."""
    if tuple(map(type, values)) not in _PLAIN_TYPES:
        return None
    return _stored_canonical(values)


def _stored_canonical(values: tuple[Any, ...]) -> bytes | None:
    """canonical() of chained values as a database driver returns them (exact str, int, datetime,
    None, float, bytes), in SORTED_FIELDS order, byte for byte; None when a value is not an int
    where an integer belongs or not a str (or, for the times, a datetime) where text belongs.

    Why the bytes are identical: for these types _plain() leaves int and str alone and turns a
    datetime into its isoformat(); json.dumps writes an int as its str() and a str as
    encode_basestring() does (its C encoder, with ensure_ascii=False), which refuses anything but
    a str; the keys are ASCII names needing no escaping, written in sorted order with "," and ":"
    separators. (A str subclass with an isoformat() method would differ; no driver returns one,
    and _fast_canonical() admits exact types only.)"""
    (
        action, client_id, department, entities, event_id, occurred, organization_id,
        organization_type, outcome, patient_enterprise_id, practitioner_id, practitioner_name,
        purpose_of_use, recorded, role, sequence, source_address, source_service, span_id,
        trace_id, type_,
    ) = values  # fmt: skip
    if type(action) is not int or type(outcome) is not int or type(sequence) is not int:
        return None
    if type(occurred) is datetime.datetime:
        occurred = occurred.isoformat()
    if type(recorded) is datetime.datetime:
        recorded = recorded.isoformat()
    e = encode_basestring
    try:
        text = (
            f'{{"action":{action},"client_id":{e(client_id)},"department":{e(department)},'
            f'"entities":{e(entities)},"event_id":{e(event_id)},"occurred":{e(occurred)},'
            f'"organization_id":{e(organization_id)},"organization_type":{e(organization_type)},'
            f'"outcome":{outcome},"patient_enterprise_id":{e(patient_enterprise_id)},'
            f'"practitioner_id":{e(practitioner_id)},"practitioner_name":{e(practitioner_name)},'
            f'"purpose_of_use":{e(purpose_of_use)},"recorded":{e(recorded)},"role":{e(role)},'
            f'"sequence":{sequence},"source_address":{e(source_address)},"source_service":{e(source_service)},'
            f'"span_id":{e(span_id)},"trace_id":{e(trace_id)},"type":{e(type_)}}}'
        )
    except TypeError:  # not text where text belongs
        return None
    return text.encode("utf-8")


def link_hash(previous_hash: str, record: Mapping[str, Any]) -> str:
    """SHA-256 over the previous hash (ASCII), a newline and canonical(record)."""
    values = _tuple_item(record, _VALUES) if type(record) is StoredRecord else _sorted_values(record)
    data = _fast_canonical(values)
    if data is None:
        data = canonical(record)
    return hashlib.sha256(previous_hash.encode("ascii") + b"\n" + data).hexdigest()


class StoredRecord(tuple[Any, ...]):
    """A stored record as the verifier reads it: the values of STORED_FIELDS, in that order, as
    the database driver returns them (the two times as datetimes or as their isoformat() text,
    which canonical() writes alike). A plain tuple, cheap to make a million of, also readable by
    field name (`record["hash"]`) like the mappings canonical(), link_hash() and ChainWalk take."""

    __slots__ = ()

    def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
        if key.__class__ is str:
            return _tuple_item(self, _STORED_INDEX[key])
        return _tuple_item(self, key)

    def keys(self) -> tuple[str, ...]:
        return STORED_FIELDS

    def as_mapping(self) -> dict[str, Any]:
        return dict(zip(STORED_FIELDS, self, strict=True))


@dataclass(frozen=True)
class ChainVerdict:
    intact: bool
    records_checked: int
    first_break_sequence: int = 0
    detail: str = ""


class ChainWalk:
    """Checks records one at a time, in sequence order, so a chain of any length streams
    through in constant memory; `broken` holds the first failure."""

    def __init__(self, *, first_sequence: int = 1, previous_hash: str = GENESIS_HASH) -> None:
        self.previous = previous_hash
        self.expected_sequence = first_sequence
        self.checked = 0
        self.broken: ChainVerdict | None = None

    def step(self, record: Mapping[str, Any]) -> bool:
        """False (and `broken` set) at the first record that does not verify."""
        if type(record) is StoredRecord:
            return self._step_stored(record)
        sequence = record["sequence"]
        if sequence != self.expected_sequence:
            self.broken = ChainVerdict(
                False, self.checked, self.expected_sequence, "a record is missing from the sequence"
            )
        elif record["previous_hash"] != self.previous:
            self.broken = ChainVerdict(
                False, self.checked, sequence, "previous hash does not match the preceding record"
            )
        elif link_hash(self.previous, record) != record["hash"]:
            self.broken = ChainVerdict(False, self.checked, sequence, "record content does not match its hash")
        if self.broken is not None:
            return False
        self.previous = record["hash"]
        self.expected_sequence += 1
        self.checked += 1
        return True

    def _step_stored(self, record: StoredRecord) -> bool:
        """step() for a StoredRecord: the same checks in the same order, without name lookups."""
        previous_hash, stored_hash = _tuple_item(record, _HEAD)
        values = _tuple_item(record, _VALUES)
        sequence = values[_SEQUENCE]
        if sequence != self.expected_sequence:
            self.broken = ChainVerdict(
                False, self.checked, self.expected_sequence, "a record is missing from the sequence"
            )
        elif previous_hash != self.previous:
            self.broken = ChainVerdict(
                False, self.checked, sequence, "previous hash does not match the preceding record"
            )
        else:
            # link_hash(self.previous, record), inlined; the values are a driver's (_stored_canonical).
            data = _stored_canonical(values) or canonical(record)
            if hashlib.sha256(self.previous.encode("ascii") + b"\n" + data).hexdigest() != stored_hash:
                self.broken = ChainVerdict(False, self.checked, sequence, "record content does not match its hash")
        if self.broken is not None:
            return False
        self.previous = stored_hash
        self.expected_sequence += 1
        self.checked += 1
        return True

    def verdict(self) -> ChainVerdict:
        return self.broken or ChainVerdict(True, self.checked)


def verify(records: Iterable[Mapping[str, Any]]) -> ChainVerdict:
    """Walk records in sequence order and report the first one that does not verify."""
    walk = ChainWalk()
    for record in records:
        if not walk.step(record):
            break
    return walk.verdict()
