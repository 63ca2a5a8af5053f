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


class ChainWalk:
    """Checks records one at a time, in sequence order, so a chain of any length streams
    through in constant memory; `broken` holds the first failure."""

    def __init__(self) -> None:
        self.previous = GENESIS_HASH
        self.expected_sequence = 1
        self.checked = 0
        self.broken: ChainVerdict | None = None

    def step(self, record: Mapping[str, Any]) -> bool:
        """False (and `broken` set) at the first record that does not verify."""
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

    def verdict(self) -> ChainVerdict:
        return self.broken or ChainVerdict(True, self.checked)


def verify(records: Iterable[Mapping[str, Any]]) -> ChainVerdict:
    """Walk records in sequence order and report the first one that does not verify."""
    walk = ChainWalk()
    for record in records:
        if not walk.step(record):
            break
    return walk.verdict()
