"""Unit tests for the audit hash chain (services.audit.chain)."""

from __future__ import annotations

import datetime
import hashlib
import itertools
import json
from typing import Any

import pytest

from services.audit.chain import CHAINED_FIELDS, GENESIS_HASH, canonical, link_hash, verify

UTC = datetime.UTC
N = 5
PRACTITIONERS = ["张伟", "欧阳娜娜", "李娜", "王芳", "司马相如"]
DEPARTMENTS = ["心血管内科", "神经内科", "急诊科", "放射科", "检验科"]


def record(sequence: int) -> dict[str, Any]:
    occurred = datetime.datetime(2025, 3, 1, 8, 0, sequence, 123456, tzinfo=UTC)
    return {
        "sequence": sequence,
        "event_id": f"5f0c7d2e-0000-4000-8000-{sequence:012d}",
        "occurred": occurred,
        "recorded": occurred + datetime.timedelta(milliseconds=250),
        "type": "rest",
        "action": "R",
        "outcome": "0",
        "organization_id": "org-bj-xicheng-hospital",
        "organization_type": "hospital",
        "client_id": "client-北京市西城区医院",
        "practitioner_id": f"doc-{sequence:03d}",
        "practitioner_name": PRACTITIONERS[(sequence - 1) % len(PRACTITIONERS)],
        "role": "physician",
        "department": DEPARTMENTS[(sequence - 1) % len(DEPARTMENTS)],
        "purpose_of_use": "treatment",
        "patient_enterprise_id": "7b1c2f56-0000-4000-8000-000000000001",
        "entities": [{"type": "DocumentReference", "id": f"doc-{sequence}", "name": "出院小结"}],
        "source_address": "10.0.3.17",
        "trace_id": f"{sequence:032x}",
        "span_id": f"{sequence:016x}",
        "source_service": "registry",
    }


def seal(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Set previous_hash and hash along the list, as the audit store does on append."""
    previous = GENESIS_HASH
    for rec in records:
        rec["previous_hash"] = previous
        rec["hash"] = link_hash(previous, rec)
        previous = rec["hash"]
    return records


@pytest.fixture
def chain() -> list[dict[str, Any]]:
    return seal([record(s) for s in range(1, N + 1)])


def altered(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 100
    if isinstance(value, datetime.datetime):
        return value + datetime.timedelta(microseconds=1)
    if isinstance(value, str):
        return value + "改"
    if isinstance(value, list):
        return [*value, {"type": "Patient", "id": "p-2"}]
    raise AssertionError(f"no alteration for {type(value)}")


def test_record_has_every_chained_field() -> None:
    assert set(CHAINED_FIELDS) <= set(record(1))
    assert len(set(CHAINED_FIELDS)) == len(CHAINED_FIELDS)


def test_clean_chain_is_intact(chain: list[dict[str, Any]]) -> None:
    verdict = verify(chain)
    assert verdict.intact
    assert verdict.records_checked == N
    assert verdict.first_break_sequence == 0
    assert verdict.detail == ""


def test_chain_is_anchored_at_genesis(chain: list[dict[str, Any]]) -> None:
    assert chain[0]["previous_hash"] == GENESIS_HASH == "0" * 64
    assert all(rec["previous_hash"] == prev["hash"] for prev, rec in itertools.pairwise(chain))


def test_empty_chain_is_intact() -> None:
    verdict = verify([])
    assert verdict.intact
    assert verdict.records_checked == 0


def test_verify_accepts_a_generator(chain: list[dict[str, Any]]) -> None:
    assert verify(rec for rec in chain).intact


@pytest.mark.parametrize("position", range(N))
@pytest.mark.parametrize("field", CHAINED_FIELDS)
def test_altering_any_chained_field_is_detected_at_that_record(
    chain: list[dict[str, Any]], field: str, position: int
) -> None:
    chain[position][field] = altered(chain[position][field])
    verdict = verify(chain)
    assert not verdict.intact
    assert verdict.first_break_sequence == position + 1
    assert verdict.records_checked == position


@pytest.mark.parametrize("position", range(N))
def test_altering_stored_hashes_is_detected(chain: list[dict[str, Any]], position: int) -> None:
    chain[position]["hash"] = hashlib.sha256(b"forged").hexdigest()
    verdict = verify(chain)
    assert not verdict.intact
    assert verdict.first_break_sequence == position + 1


@pytest.mark.parametrize("position", range(1, N - 1))
def test_removing_a_middle_record_is_detected(chain: list[dict[str, Any]], position: int) -> None:
    removed = chain.pop(position)
    verdict = verify(chain)
    assert not verdict.intact
    assert verdict.first_break_sequence == removed["sequence"]
    assert verdict.records_checked == position
    assert "missing" in verdict.detail


def test_removing_the_first_record_is_detected(chain: list[dict[str, Any]]) -> None:
    verdict = verify(chain[1:])
    assert not verdict.intact
    assert verdict.first_break_sequence == 1


def test_removing_and_renumbering_is_detected(chain: list[dict[str, Any]]) -> None:
    del chain[2]
    for number, rec in enumerate(chain, start=1):
        rec["sequence"] = number
    verdict = verify(chain)
    assert not verdict.intact
    assert verdict.first_break_sequence == 3


@pytest.mark.parametrize(("i", "j"), [(0, 1), (1, 3), (2, 4), (0, 4)])
def test_swapping_two_records_is_detected(chain: list[dict[str, Any]], i: int, j: int) -> None:
    chain[i], chain[j] = chain[j], chain[i]
    verdict = verify(chain)
    assert not verdict.intact
    assert verdict.first_break_sequence == i + 1


def test_swapping_contents_but_keeping_sequence_numbers_is_detected(chain: list[dict[str, Any]]) -> None:
    chain[1]["practitioner_name"], chain[2]["practitioner_name"] = (
        chain[2]["practitioner_name"],
        chain[1]["practitioner_name"],
    )
    verdict = verify(chain)
    assert not verdict.intact
    assert verdict.first_break_sequence == 2


@pytest.mark.parametrize("position", range(N - 1))
def test_rehashing_an_altered_record_breaks_at_the_next(chain: list[dict[str, Any]], position: int) -> None:
    rec = chain[position]
    rec["practitioner_name"] = "冒名顶替"
    rec["hash"] = link_hash(rec["previous_hash"], rec)
    verdict = verify(chain)
    assert not verdict.intact
    assert verdict.first_break_sequence == position + 2
    assert verdict.records_checked == position + 1
    assert "previous hash" in verdict.detail


def test_rewriting_the_whole_tail_from_an_altered_record_verifies(chain: list[dict[str, Any]]) -> None:
    # The chain proves order and integrity relative to its head; an attacker who can rewrite every
    # later record can re-seal it.  Anchoring the head hash elsewhere is what guards against that.
    chain[2]["outcome"] = "8"
    assert not verify(chain).intact
    assert verify(seal(chain)).intact


# --- canonical / link_hash -------------------------------------------------------------------


def test_canonical_is_deterministic_and_independent_of_key_order() -> None:
    rec = record(3)
    reordered = dict(reversed(list(rec.items())))
    assert list(reordered) != list(rec)
    assert canonical(rec) == canonical(record(3)) == canonical(reordered)


def test_canonical_covers_only_chained_fields() -> None:
    rec = record(2)
    extra = {**rec, "hash": "f" * 64, "previous_hash": "e" * 64, "stored_at": "anything"}
    assert canonical(extra) == canonical(rec)
    decoded = json.loads(canonical(rec))
    assert list(decoded) == sorted(CHAINED_FIELDS)


def test_canonical_is_compact_utf8_json_with_iso_datetimes() -> None:
    data = canonical(record(1))
    assert isinstance(data, bytes)
    text = data.decode("utf-8")
    assert "张伟".encode() in data
    assert "心血管内科".encode() in data
    assert "\\u" not in text
    assert ", " not in text
    assert '": ' not in text
    decoded = json.loads(text)
    assert decoded["occurred"] == "2025-03-01T08:00:01.123456+00:00"
    assert decoded["practitioner_name"] == "张伟"
    assert decoded["entities"] == [{"type": "DocumentReference", "id": "doc-1", "name": "出院小结"}]


def test_canonical_requires_every_chained_field() -> None:
    rec = record(1)
    del rec["department"]
    with pytest.raises(KeyError):
        canonical(rec)


def test_link_hash_depends_on_previous_hash_and_content() -> None:
    rec = record(1)
    expected = hashlib.sha256(GENESIS_HASH.encode() + b"\n" + canonical(rec)).hexdigest()
    assert link_hash(GENESIS_HASH, rec) == expected
    assert link_hash("1" * 64, rec) != expected
    assert link_hash(GENESIS_HASH, {**rec, "practitioner_name": "李娜"}) != expected
