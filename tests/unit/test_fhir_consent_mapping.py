"""The FHIR R4 Consent facade's provision mapping (gateway/routes/fhir/consent.py), both ways."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.errors import ApiError
from gateway.routes.fhir.consent import provision_message, provision_resource

ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"

FHIR_PROVISION: dict[str, Any] = {
    "type": "deny",
    "period": {"start": "2026-01-01T00:00:00+00:00", "end": "2027-01-01T00:00:00+00:00"},
    "actor": [
        {"reference": {"identifier": {"system": "urn:hie:region", "value": "all-members"}}},
        {"reference": {"identifier": {"system": "urn:hie:organization", "value": "hosp-b"}}},
        {"reference": {"identifier": {"system": "urn:hie:department:hosp-b", "value": "精神科"}}},
        {"reference": {"identifier": {"system": "urn:hie:practitioner:hosp-b", "value": "D-7"}}},
    ],
    "action": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentaction", "code": "access"}]}],
    "securityLabel": [
        {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "PSY"},
        {"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"},
    ],
    "purpose": [
        {"system": ACT_REASON, "code": "HRESCH"},
        {"system": "urn:hie:purpose-of-use", "code": "referral"},
    ],
    "class": [{"system": "urn:hie:document-class", "code": "imaging"}],
    "code": [{"coding": [{"system": "http://loinc.org", "code": "18748-4"}]}],
    "dataPeriod": {"start": "2025-06-01T00:00:00+00:00"},
    "data": [{"meaning": "instance", "reference": {"reference": "DocumentReference/doc-1"}}],
    "provision": [{"type": "permit", "extension": [{"url": "urn:hie:obligation", "valueCode": "deidentify"}]}],
}


def test_every_element_maps_both_ways() -> None:
    message = provision_message(FHIR_PROVISION)
    assert [(a.kind, a.organization_id, a.department, a.practitioner_id) for a in message.actors] == [
        (1, "", "", ""),
        (2, "hosp-b", "", ""),
        (3, "hosp-b", "精神科", ""),
        (4, "hosp-b", "", "D-7"),
    ]
    assert list(message.purposes) == ["research", "referral"]
    assert list(message.documents) == ["doc-1"]
    assert list(message.provisions[0].obligations) == ["deidentify"]
    back = provision_resource(message)
    assert back["purpose"] == [
        {"system": "urn:hie:purpose-of-use", "code": "research"},
        {"system": "urn:hie:purpose-of-use", "code": "referral"},
    ]
    # Our own purpose words come back; every other element as it went in.
    assert provision_message(back) == message
    assert back["securityLabel"] == FHIR_PROVISION["securityLabel"]
    assert back["data"] == FHIR_PROVISION["data"]
    assert back["dataPeriod"] == FHIR_PROVISION["dataPeriod"]
    assert [a["reference"]["identifier"] for a in back["actor"]] == [
        a["reference"]["identifier"] for a in FHIR_PROVISION["actor"]
    ]


@pytest.mark.parametrize(
    "bad",
    [
        {"type": "maybe"},
        {"type": "deny", "purpose": [{"system": ACT_REASON, "code": "COC"}]},
        {"type": "deny", "actor": [{"reference": {"reference": "Organization/x"}}]},
        {"type": "deny", "actor": [{"reference": {"identifier": {"system": "urn:other", "value": "x"}}}]},
        {"type": "deny", "data": [{"reference": {"reference": "Patient/1"}}]},
        {"type": "deny", "period": {"start": "2026-01-01T00:00:00"}},
        {"type": "deny", "period": {"start": "not a date"}},
        {"type": "deny", "securityLabel": "PSY"},
        {"type": "deny", "provision": {"type": "permit"}},
    ],
)
def test_bad_provisions_are_400(bad: dict[str, Any]) -> None:
    with pytest.raises(ApiError) as refused:
        provision_message(bad)
    assert (refused.value.status, refused.value.reason) == (400, "consent-invalid")
