"""The consultation report (pure): rendering, canonical form, the detached signature by a
registered key, the turnaround policy and the statistics' percentiles."""

from __future__ import annotations

import datetime

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from services.shared.errors import InvalidArgument, PermissionDenied
from services.shared.keys import generate_ec_key, public_jwk
from services.teleconsult import report
from services.teleconsult.deadlines import KINDS, URGENCIES, DeadlinePolicy
from services.teleconsult.directory import _percentile

CONTENT = {
    "findings": "右肺上叶见 8mm 磨玻璃结节",
    "impression": "考虑原位腺癌可能",
    "recommendations": "3个月复查",
    "opinions": [{"practitioner_id": "D1", "practitioner_name": "肿瘤科主任", "opinion": "建议手术"}],
    "conclusion": "先行手术",
}


def _rendered(**overrides: object) -> dict:
    args = {
        "consultation_id": "c-1",
        "version": 1,
        "status": "final",
        "kind": KINDS["imaging"],
        "patient_domain": "hosp-q",
        "patient_local_id": "P-1",
        "consultant_organization_id": "hosp-c",
        "interpreters": ["D1"],
        "content": CONTENT,
        "issued": datetime.datetime(2026, 12, 5, 8, 0, tzinfo=datetime.UTC),
        "imaging_study_uids": ["1.2.3"],
        **overrides,
    }
    return report.render(**args)  # type: ignore[arg-type]


def test_render_round_trips_the_structured_content() -> None:
    resource = _rendered()
    assert resource["basedOn"] == [{"reference": "ServiceRequest/c-1"}]
    assert resource["conclusion"] == CONTENT["impression"]
    assert report.content_of(resource) == CONTENT


def test_a_signature_by_a_registered_key_verifies_and_covers_the_content() -> None:
    key = generate_ec_key()
    resource = _rendered()
    jws = report.sign(resource, key)
    registered = frozenset({public_jwk(key)["kid"]})
    assert report.verify(resource, jws, registered=registered)["kid"] == public_jwk(key)["kid"]
    # Key order and whitespace do not matter; the content does.
    assert report.verify(dict(reversed(list(resource.items()))), jws, registered=registered)
    with pytest.raises(InvalidArgument) as changed:
        report.verify({**resource, "conclusion": "良性"}, jws, registered=registered)
    assert changed.value.reason == "consultation-signature-invalid"


def test_an_rsa_key_signs_too_and_an_unregistered_key_is_refused() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    resource = _rendered()
    jws = report.sign(resource, key)
    assert report.verify(resource, jws, registered=frozenset({public_jwk(key)["kid"]}))
    with pytest.raises(PermissionDenied) as other:
        report.verify(resource, jws, registered=frozenset({public_jwk(generate_ec_key())["kid"]}))
    assert other.value.reason == "consultation-signature-key"


def test_not_a_jws_is_refused() -> None:
    with pytest.raises(InvalidArgument):
        report.verify(_rendered(), "not-a-jws", registered=frozenset())


def test_submitted_report_must_be_the_rendered_one() -> None:
    with pytest.raises(InvalidArgument):
        report.check_submitted({**_rendered(), "status": "preliminary"}, expected=_rendered())
    report.check_submitted(_rendered(), expected=_rendered())


def test_turnaround_policy_defaults_and_overrides() -> None:
    policy = DeadlinePolicy()
    assert policy.period(KINDS["ecg"], URGENCIES["emergency"]) == datetime.timedelta(minutes=30)
    assert policy.period(KINDS["pathology"], URGENCIES["urgent"]) == datetime.timedelta(hours=24)
    assert policy.period(KINDS["specialist"], URGENCIES["routine"]) == datetime.timedelta(hours=72)
    custom = DeadlinePolicy.parse("ecg/emergency=20m, */routine=2d")
    assert custom.period(KINDS["ecg"], URGENCIES["emergency"]) == datetime.timedelta(minutes=20)
    assert custom.period(KINDS["imaging"], URGENCIES["routine"]) == datetime.timedelta(days=2)
    assert custom("other-clock", {"kind": KINDS["ecg"], "urgency": URGENCIES["emergency"]}) is None
    with pytest.raises(InvalidArgument):
        DeadlinePolicy.parse("ecg/soon=1h")


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 11)]
    assert _percentile(values, 0.9) == 9.0
    assert _percentile([], 0.9) == 0.0
    assert _percentile([5.0], 0.9) == 5.0
