"""Unit tests for the registry's pure rules: shared document types, streamed integrity checks,
life-cycle relations, imaging references, query cursors, and subscription / notification rules."""

from __future__ import annotations

import datetime
import hashlib
import json

import pytest

from services.registry import document_types, domain, dsub
from services.shared.errors import DataCorruption, FailedPrecondition, InvalidArgument, NotFound

NOW = datetime.datetime(2026, 11, 22, 8, 0, tzinfo=datetime.UTC)


@pytest.mark.parametrize(
    ("system", "code", "shared"),
    [
        (document_types.SHARED_TYPE_SYSTEM, "discharge-summary", "discharge-summary"),
        (document_types.LOINC, "18842-5", "discharge-summary"),
        ("", "11502-2", "lab-report"),
        ("", "ultrasound-report", "ultrasound-report"),
        ("urn:oid:2.16.156.local", "18842-5", None),
        (document_types.LOINC, "99999-9", None),
    ],
)
def test_shared_type_lookup(system: str, code: str, shared: str | None) -> None:
    found = document_types.shared_type_of(system, code)
    assert (found.code if found else None) == shared


def test_every_shared_type_has_a_chinese_display_and_a_known_class() -> None:
    for kind in document_types.SHARED_DOCUMENT_TYPES:
        assert kind.display
        assert kind.class_code in document_types.CLASS_DISPLAY


def test_streamed_content_is_checked_against_the_declaration() -> None:
    content = "出院小结".encode() * 1000
    hasher = domain.ContentHasher()
    for i in range(0, len(content), 333):
        hasher.update(content[i : i + 333])
    sha = domain.check_declaration(hashlib.sha256(content).hexdigest().upper())
    assert domain.check_received(hasher, declared_sha256=sha, declared_size=0).size == len(content)
    with pytest.raises(InvalidArgument) as wrong:
        domain.check_received(hasher, declared_sha256="0" * 64, declared_size=0)
    assert wrong.value.reason == "hash-mismatch"
    with pytest.raises(InvalidArgument) as size:
        domain.check_received(hasher, declared_sha256=sha, declared_size=len(content) + 1)
    assert size.value.reason == "size-mismatch"
    with pytest.raises(DataCorruption):
        domain.check_retrieved(hasher, sha256=sha, size=len(content) - 1)
    with pytest.raises(InvalidArgument) as invalid:
        domain.check_declaration("abc")
    assert invalid.value.reason == "hash-invalid"


def test_content_over_the_limit_is_refused_as_it_arrives() -> None:
    hasher = domain.ContentHasher(limit=10)
    hasher.update(b"0123456789")
    with pytest.raises(InvalidArgument) as large:
        hasher.update(b"x")
    assert large.value.reason == "content-too-large"


def _relation(**overrides: object) -> None:
    arguments: dict[str, object] = {
        "target_status": domain.CURRENT,
        "target_source_organization_id": "org-a",
        "target_enterprise_id": "E1",
        "organization_id": "org-a",
        "enterprise_id": "E1",
        **overrides,
    }
    domain.check_relation(domain.REPLACES, **arguments)  # type: ignore[arg-type]


def test_relation_rules() -> None:
    _relation()
    with pytest.raises(NotFound):
        _relation(organization_id="org-b")
    with pytest.raises(FailedPrecondition):
        _relation(target_status=domain.SUPERSEDED)
    with pytest.raises(InvalidArgument) as other:
        _relation(enterprise_id="E2")
    assert other.value.reason == "relation-patient-mismatch"


def test_imaging_study_reference() -> None:
    uid = "1.2.840.10008.5.1.4.1.1.2"
    assert domain.check_imaging_study(uid, f"https://pacs.example/wado/studies/{uid}") == (
        uid,
        f"https://pacs.example/wado/studies/{uid}",
    )
    for bad_uid in ("1.02.3", "abc", "1", "1." * 40 + "1"):
        with pytest.raises(InvalidArgument):
            domain.check_imaging_study(bad_uid, f"https://pacs.example/studies/{bad_uid}")
    with pytest.raises(InvalidArgument) as other_study:
        domain.check_imaging_study(uid, "https://pacs.example/studies/1.2.3")
    assert other_study.value.reason == "wado-url-invalid"


def test_query_cursor_round_trip_and_refusals() -> None:
    cursor = domain.QueryCursor(NOW, "6f1c2a39-6b8e-4d3c-9f7e-2b1a0c9d8e7f")
    assert domain.QueryCursor.decode(cursor.encode()) == cursor
    assert domain.QueryCursor.decode("") is None
    for token in ("not-a-cursor", "MjAyNi0xMS0yMlQwODowMDowMHx4", "%%%"):
        with pytest.raises(InvalidArgument) as bad:
            domain.QueryCursor.decode(token)
        assert bad.value.reason == "page-token"


def test_subscription_rules() -> None:
    assert dsub.check_endpoint("https://his.example/notify", production=True) == "https://his.example/notify"
    assert dsub.check_endpoint("http://127.0.0.1:8080/n", production=False)
    for url in ("http://his.example/n", "https://user:pw@his.example/n", "ftp://x/y", "https:///n"):
        with pytest.raises(InvalidArgument):
            dsub.check_endpoint(url, production=True)
    assert dsub.check_expiry(NOW + datetime.timedelta(days=30), NOW)
    for expires in (None, NOW, NOW + datetime.timedelta(days=400)):
        with pytest.raises(InvalidArgument):
            dsub.check_expiry(expires, NOW)
    assert dsub.check_event_type("referral.accepted")
    with pytest.raises(InvalidArgument):
        dsub.check_event_type("Referral Accepted")


def test_only_unrestricted_current_documents_are_announced() -> None:
    assert dsub.announced(confidentiality="N", security_labels=[], status=1)
    assert not dsub.announced(confidentiality="R", security_labels=[], status=1)
    assert not dsub.announced(confidentiality="N", security_labels=["PSY"], status=1)
    assert not dsub.announced(confidentiality="N", security_labels=[], status=3)


def test_notification_payload_survives_the_outbox_and_keeps_its_event_id() -> None:
    item = dsub.notification(
        subscription_id="S1",
        organization_id="org-b",
        endpoint_url="https://his.example/n",
        topic=dsub.TOPIC_PATIENT_DOCUMENT,
        event_type="document.registered",
        occurred=NOW,
        subject={"patient": {"domain": "org-b", "local_ids": ["本院-1"]}},
        trace_id="0" * 31 + "1",
        span_id="0" * 15 + "1",
    )
    again = dsub.Notification.from_payload(item.payload())
    assert again == item
    body = json.loads(again.body)
    assert body["event_id"] == item.event_id
    assert body["patient"]["local_ids"] == ["本院-1"]
    assert body["topic"] == "patient-document"
