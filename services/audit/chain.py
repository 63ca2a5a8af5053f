"""The hash chain over audit records (pure: no I/O).

Each record's hash is SHA-256 over the previous record's hash and the record's canonical
content, so altering or removing any record breaks every hash after it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
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
    """The bytes a record's hash covers: its chained fields as sorted, compact UTF-8 JSON."""
    content = {name: _plain(record[name]) for name in CHAINED_FIELDS}
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _plain(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def link_hash(previous_hash: str, record: Mapping[str, Any]) -> str:
    digest = hashlib.sha256()
    digest.update(previous_hash.encode("ascii"))
    digest.update(b"\n")
    digest.update(canonical(record))
    return digest.hexdigest()


@dataclass(frozen=True)
class ChainVerdict:
    intact: bool
    records_checked: int
    first_break_sequence: int = 0
    detail: str = ""


def verify(records: Iterable[Mapping[str, Any]]) -> ChainVerdict:
    """Walk records in sequence order and report the first one that does not verify."""
    previous = GENESIS_HASH
    expected_sequence = 1
    checked = 0
    for record in records:
        sequence = record["sequence"]
        if sequence != expected_sequence:
            return ChainVerdict(False, checked, expected_sequence, "a record is missing from the sequence")
        if record["previous_hash"] != previous:
            return ChainVerdict(False, checked, sequence, "previous hash does not match the preceding record")
        if link_hash(previous, record) != record["hash"]:
            return ChainVerdict(False, checked, sequence, "record content does not match its hash")
        previous = record["hash"]
        expected_sequence += 1
        checked += 1
    return ChainVerdict(True, checked)
