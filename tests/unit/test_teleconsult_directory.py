"""The application form, informed consent, qualification and booking rules (pure)."""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass

import pytest

from hie.common.v1 import common_pb2
from hie.teleconsult.v1 import teleconsult_pb2 as pb
from services.shared.errors import FailedPrecondition, InvalidArgument
from services.teleconsult import directory

NOW = datetime.datetime(2026, 12, 5, 8, 0, tzinfo=datetime.UTC)


def _form(**overrides: object) -> pb.Consultation:
    fields = {
        "patient": common_pb2.PatientRef(local_id="P-1"),
        "consultant_organization_id": "hosp-c",
        "kind": pb.CONSULTATION_KIND_IMAGING,
        "question": "肺结节性质？",
        **overrides,
    }
    return pb.Consultation(**fields)  # type: ignore[arg-type]


def test_a_form_defaults_to_asynchronous_and_routine() -> None:
    form = directory.check_form(_form(), requester_organization_id="hosp-q")
    assert (form.mode, form.urgency) == (pb.CONSULTATION_MODE_ASYNCHRONOUS, pb.CONSULTATION_URGENCY_ROUTINE)
    assert form.texts["question"] == "肺结节性质？"


@pytest.mark.parametrize(
    "overrides",
    [
        {"question": ""},
        {"kind": pb.CONSULTATION_KIND_MULTIDISCIPLINARY},  # an MDT is interactive
        {"professional_title": "教授"},
        {"imaging_studies": [pb.ImagingStudy(study_instance_uid="1.2.x", wado_rs_url="https://pacs/x")]},
        {"imaging_studies": [pb.ImagingStudy(study_instance_uid="1.2.3", wado_rs_url="http://pacs/x")]},
    ],
)
def test_an_incomplete_or_wrong_form_is_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument) as refused:
        directory.check_form(_form(**overrides), requester_organization_id="hosp-q")
    assert refused.value.reason == "consultation-invalid"


def test_a_consultation_of_the_requester_itself_is_refused_with_its_reason() -> None:
    with pytest.raises(InvalidArgument) as refused:
        directory.check_form(_form(consultant_organization_id="hosp-q"), requester_organization_id="hosp-q")
    assert refused.value.reason == "self-consultation"


def _consent(**overrides: object) -> pb.InformedConsent:
    return pb.InformedConsent(**{"evidence_document_id": "doc-1", "signer": "patient", **overrides})  # type: ignore[arg-type]


def test_an_adult_signs_and_a_minors_guardian_signs() -> None:
    adult = directory.check_informed_consent(_consent(), birth_date="1980-01-01", today=NOW.date(), now=NOW)
    assert adult["signer"] == "patient"
    with pytest.raises(FailedPrecondition) as minor:
        directory.check_informed_consent(_consent(), birth_date="2010-12-06", today=NOW.date(), now=NOW)
    assert minor.value.reason == "consultation-guardian-required"
    # The day they turn 18 they sign themselves.
    directory.check_informed_consent(_consent(), birth_date="2008-12-05", today=NOW.date(), now=NOW)
    guardian = directory.check_informed_consent(
        _consent(signer="guardian", guardian_name="王芳", guardian_relationship="母亲"),
        birth_date="2018-01-01",
        today=NOW.date(),
        now=NOW,
    )
    assert guardian["guardian_relationship"] == "母亲"
    with pytest.raises(InvalidArgument):
        directory.check_informed_consent(
            _consent(signer="guardian"), birth_date="2018-01-01", today=NOW.date(), now=NOW
        )


@dataclass
class _Specialist:
    practitioner_id: str
    years_independent_practice: int
    kinds: str
    active: bool = True
    professional_title: str = "主治医师"


def test_qualification_needs_years_kind_and_an_mdt_of_two() -> None:
    rules = directory.QualificationRules(min_practice_years=3)
    senior = _Specialist("D1", 10, json.dumps([pb.CONSULTATION_KIND_ECG]))
    junior = _Specialist("D2", 2, json.dumps([pb.CONSULTATION_KIND_ECG]))
    other = _Specialist("D3", 10, json.dumps([pb.CONSULTATION_KIND_PATHOLOGY]))
    table = {s.practitioner_id: s for s in (senior, junior, other)}
    rules.check_assignees(["D1"], table, kind=pb.CONSULTATION_KIND_ECG)
    for chosen in (["D2"], ["D3"], ["D9"]):
        with pytest.raises(FailedPrecondition) as refused:
            rules.check_assignees(chosen, table, kind=pb.CONSULTATION_KIND_ECG)
        assert refused.value.reason == "consultation-not-qualified"
    with pytest.raises(FailedPrecondition) as small:
        rules.check_assignees(["D1"], table, kind=pb.CONSULTATION_KIND_MULTIDISCIPLINARY)
    assert small.value.reason == "consultation-mdt-size"
    rules.check_assignees(["D1", "D3"], table, kind=pb.CONSULTATION_KIND_MULTIDISCIPLINARY)


@dataclass
class _Slot:
    practitioner_id: str
    start_at: datetime.datetime
    end_at: datetime.datetime
    consultation_id: str | None = None


def test_booking_needs_one_free_overlapping_slot_per_participant() -> None:
    half = datetime.timedelta(minutes=30)
    a, b = _Slot("D1", NOW, NOW + half), _Slot("D2", NOW + datetime.timedelta(minutes=10), NOW + half)
    assert directory.check_booking([a, b], slot_ids=["s1", "s2"], participants=["D1", "D2"]) == (
        NOW + datetime.timedelta(minutes=10),
        NOW + half,
    )
    with pytest.raises(FailedPrecondition):
        directory.check_booking([a], slot_ids=["s1"], participants=["D1", "D2"])
    with pytest.raises(FailedPrecondition) as taken:
        directory.check_booking(
            [a, _Slot("D2", NOW, NOW + half, "other")], slot_ids=["s1", "s2"], participants=["D1", "D2"]
        )
    assert taken.value.reason == "consultation-slot-taken"
    apart = _Slot("D2", NOW + half, NOW + 2 * half)
    with pytest.raises(FailedPrecondition):
        directory.check_booking([a, apart], slot_ids=["s1", "s2"], participants=["D1", "D2"])
