"""Unit tests for the document submission rules (services.registry.domain)."""

from __future__ import annotations

import hashlib

import pytest

from services.registry import domain
from services.registry.domain import (
    CONFIDENTIALITY,
    ContentDigest,
    check_confidentiality,
    check_declared,
    check_mime_type,
    check_source_document_id,
    check_stored,
    clean_text,
    digest,
)
from services.shared.errors import DataCorruption, InvalidArgument

CONTENT = "<ClinicalDocument><title>出院小结</title><patient>张伟</patient></ClinicalDocument>".encode()
SHA = hashlib.sha256(CONTENT).hexdigest()


def invalid_reason(func, *args, **kwargs) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgument) as info:
        func(*args, **kwargs)
    return info.value.reason


# --- check_declared --------------------------------------------------------------------------


def test_digest() -> None:
    assert digest(CONTENT) == ContentDigest(SHA, len(CONTENT))


@pytest.mark.parametrize("declared_size", [len(CONTENT), 0])
def test_matching_declaration_is_accepted(declared_size: int) -> None:
    assert check_declared(CONTENT, declared_sha256=SHA, declared_size=declared_size) == ContentDigest(SHA, len(CONTENT))


def test_upper_case_hash_is_accepted_and_reported_lower_case() -> None:
    result = check_declared(CONTENT, declared_sha256=SHA.upper(), declared_size=len(CONTENT))
    assert result.sha256 == SHA


def test_empty_content_is_rejected() -> None:
    empty_sha = hashlib.sha256(b"").hexdigest()
    assert invalid_reason(check_declared, b"", declared_sha256=empty_sha, declared_size=0) == "content-empty"


def test_content_over_the_limit_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(domain, "MAX_CONTENT_BYTES", 16)
    at_limit = b"x" * 16
    over = b"x" * 17
    assert check_declared(at_limit, declared_sha256=hashlib.sha256(at_limit).hexdigest(), declared_size=16)
    reason = invalid_reason(check_declared, over, declared_sha256=hashlib.sha256(over).hexdigest(), declared_size=17)
    assert reason == "content-too-large"


@pytest.mark.parametrize(
    "declared",
    ["", SHA[:63], SHA + "0", "g" * 64, " " + SHA, SHA + "\n", SHA[:62] + "-0", "0x" + SHA[:62], "ａ" * 64],
    ids=["empty", "63", "65", "non-hex", "leading-space", "trailing-newline", "dash", "0x", "full-width"],
)
def test_malformed_declared_hash_is_rejected(declared: str) -> None:
    assert invalid_reason(check_declared, CONTENT, declared_sha256=declared, declared_size=0) == "hash-invalid"


def test_hash_mismatch() -> None:
    other = hashlib.sha256(CONTENT + b" ").hexdigest()
    assert invalid_reason(check_declared, CONTENT, declared_sha256=other, declared_size=0) == "hash-mismatch"


@pytest.mark.parametrize("declared_size", [len(CONTENT) - 1, len(CONTENT) + 1, 1, -1])
def test_size_mismatch(declared_size: int) -> None:
    reason = invalid_reason(check_declared, CONTENT, declared_sha256=SHA, declared_size=declared_size)
    assert reason == "size-mismatch"


# --- check_stored ----------------------------------------------------------------------------


def test_intact_stored_content_passes() -> None:
    check_stored(CONTENT, sha256=SHA, size=len(CONTENT))


@pytest.mark.parametrize(
    ("content", "sha256", "size"),
    [
        (CONTENT.replace("张伟".encode(), "李娜".encode()), SHA, len(CONTENT)),
        (CONTENT[:-1], SHA, len(CONTENT)),
        (CONTENT + b"\x00", SHA, len(CONTENT)),
        (b"", SHA, len(CONTENT)),
        (CONTENT, SHA, len(CONTENT) + 1),
        (CONTENT, SHA.upper(), len(CONTENT)),
        (CONTENT, hashlib.sha256(b"other").hexdigest(), len(CONTENT)),
    ],
    ids=["tampered", "truncated", "appended", "emptied", "size", "hash-case", "other-hash"],
)
def test_tampered_stored_content_is_data_corruption(content: bytes, sha256: str, size: int) -> None:
    with pytest.raises(DataCorruption) as info:
        check_stored(content, sha256=sha256, size=size)
    assert info.value.reason == "content-corrupt"


# --- source document id ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["1.2.156.112604.1.2.3^20250601", "doc-01", "urn:oid:1.2.3", "A_b.C:d-e^f", "0", "d" * 128],
)
def test_valid_source_document_ids(value: str) -> None:
    assert check_source_document_id(value) == value


@pytest.mark.parametrize(
    "value",
    ["", "-doc", "^doc", ".doc", "d" * 129, "doc 01", "doc/01", "文档01", "doc-01\n", "doc#1"],
)
def test_invalid_source_document_ids(value: str) -> None:
    assert invalid_reason(check_source_document_id, value) == "source-document-id-invalid"


# --- mime type -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("text/xml", "text/xml"),
        ("application/fhir+json", "application/fhir+json"),
        ("application/pdf", "application/pdf"),
        ("application/hl7-v3+xml", "application/hl7-v3+xml"),
        (" Text/XML ", "text/xml"),
        ("text/xml; charset=UTF-8", "text/xml; charset=utf-8"),
        ("application/vnd.ms-excel", "application/vnd.ms-excel"),
    ],
)
def test_valid_mime_types_are_lower_cased(value: str, expected: str) -> None:
    assert check_mime_type(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        "text",
        "../etc",
        "../etc/passwd",
        "/xml",
        "text/",
        "text/xml/extra",
        "text xml",
        "文本/xml",
        "application/" + "a" * 89,  # 101 characters
        "text/xml;\nX-Injected: 1",
    ],
)
def test_invalid_mime_types(value: str) -> None:
    assert invalid_reason(check_mime_type, value) == "mime-type-invalid"


def test_mime_type_length_limit() -> None:
    at_limit = "application/" + "a" * 88
    assert len(at_limit) == 100
    assert check_mime_type(at_limit) == at_limit


@pytest.mark.parametrize("value", ["text/xml;\r", "text/xml; charset=utf-8\x00"], ids=["cr", "nul"])
def test_mime_type_with_control_characters_is_rejected(value: str) -> None:
    assert invalid_reason(check_mime_type, value) == "mime-type-invalid"


# --- confidentiality -------------------------------------------------------------------------


def test_confidentiality_defaults_to_normal() -> None:
    assert check_confidentiality("") == "N"


@pytest.mark.parametrize("code", ["U", "L", "M", "N", "R", "V"])
def test_hl7_confidentiality_codes_are_accepted(code: str) -> None:
    assert check_confidentiality(code) == code


def test_confidentiality_code_set() -> None:
    assert frozenset("ULMNRV") == CONFIDENTIALITY


@pytest.mark.parametrize("code", ["n", "r", "X", "NN", " N", "N ", "normal", "PSY", "Ｎ"])
def test_other_confidentiality_codes_are_rejected(code: str) -> None:
    assert invalid_reason(check_confidentiality, code) == "confidentiality"


# --- clean_text ------------------------------------------------------------------------------


def test_clean_text_strips_and_keeps_chinese() -> None:
    assert clean_text("  出院小结（心内科）\n", what="title", limit=64) == "出院小结（心内科）"


def test_clean_text_nfc_normalises() -> None:
    assert clean_text("Re\u0301sume\u0301 北京", what="title", limit=64) == "R\u00e9sum\u00e9 北京"


@pytest.mark.parametrize("value", ["", "   ", "\u3000\n"])
def test_clean_text_required(value: str) -> None:
    assert invalid_reason(clean_text, value, what="title", limit=64, required=True) == "title-missing"
    assert clean_text(value, what="title", limit=64) == ""


def test_clean_text_limit() -> None:
    assert clean_text("北" * 10, what="title", limit=10) == "北" * 10
    assert invalid_reason(clean_text, "北" * 11, what="title", limit=10) == "title-too-long"


@pytest.mark.parametrize("value", ["出院\x00小结", "出院\r\n小结", "出院\u200d小结", "出院\u2066小结", "\ue123"])
def test_clean_text_rejects_control_characters(value: str) -> None:
    assert invalid_reason(clean_text, value, what="comments", limit=500) == "comments-invalid"


def test_endpoint_addresses_never_link_local_loopback_only_when_configured() -> None:
    """SSRF: link-local (the metadata service) is refused even when listed; loopback only with
    HIE_NOTIFY_ALLOW_LOOPBACK; the exchange's own ports never on a non-public address."""
    from services.registry.dsub import EndpointPolicy

    listed = EndpointPolicy.parse(
        '{"*": ["http://169.254.169.254/", "http://127.0.0.1:9000/"]}', "169.254.0.0/16", production=True
    )
    assert not listed.address_allowed("169.254.169.254", "http://169.254.169.254/", 80)
    dev = EndpointPolicy.parse("", production=False)
    assert not dev.address_allowed("127.0.0.1", "http://127.0.0.1/", 80)
    assert dev.address_allowed("203.0.113.7", "http://his.example/", 80)
    tests = EndpointPolicy.parse("", production=False, allow_loopback=True, own_ports=frozenset({7106}))
    assert tests.address_allowed("127.0.0.1", "http://127.0.0.1:9000/", 9000)
    assert not tests.address_allowed("127.0.0.1", "http://127.0.0.1:7106/", 7106)
    assert not tests.address_allowed("10.0.0.5", "http://10.0.0.5:7106/", 7106)


def test_registrations_then_reads_flags_an_organisation_reading_strangers() -> None:
    """The authority's report: an organisation that registers people and at once reads other
    hospitals' documents about them stands out from the region."""
    import datetime

    from google.protobuf.timestamp_pb2 import Timestamp

    from gateway.routes.audit import registrations_then_reads
    from hie.audit.v1 import audit_pb2
    from hie.common.v1 import common_pb2

    def event(kind: str, org: str, person: str, minute: int, source: str = "") -> audit_pb2.AuditEvent:
        at = Timestamp()
        at.FromDatetime(datetime.datetime(2026, 12, 1, 8, minute, tzinfo=datetime.UTC))
        entities = [audit_pb2.EntityRef(type="DocumentReference", id=f"doc-{person}")]
        if source:
            entities.append(audit_pb2.EntityRef(type="Organization", id=source))
        return audit_pb2.AuditEvent(
            type=kind,
            actor=common_pb2.CallerContext(organization_id=org),
            patient_enterprise_id=person,
            occurred=at,
            outcome=audit_pb2.OUTCOME_SUCCESS,
            entities=entities,
        )

    registrations = [event("patient.register", "harvester", f"p{i}", 1) for i in range(6)]
    reads = [event("document.retrieve", "harvester", f"p{i}", 2, source="org-a") for i in range(6)]
    # A hospital that knew its patients before the period: reads, no fresh registrations.
    reads += [event("document.retrieve", "regular", f"q{i}", 2, source="org-a") for i in range(6)]
    rows = {r["organization_id"]: r for r in registrations_then_reads(registrations, reads)}
    assert rows["harvester"]["share_without_prior_encounter"] == 1.0
    assert rows["harvester"]["outlier"] is True
    assert rows["regular"]["share_without_prior_encounter"] == 0.0
    assert rows["regular"]["outlier"] is False
