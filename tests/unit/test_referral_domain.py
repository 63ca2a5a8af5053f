"""Referral rules without I/O: ICD-10 codes, tiers to direction, attachment limits, deadline
durations (defaults and configuration), statistics of a known set."""

from __future__ import annotations

import datetime

import pytest

from services.referral import directory, domain
from services.referral.deadlines import DeadlinePolicy
from services.shared.errors import InvalidArgument

T0 = datetime.datetime(2026, 12, 1, 8, 0, tzinfo=datetime.UTC)


@pytest.mark.parametrize("code", ["I20.0", "i20.0", "E11.9", "J18.9", "S72.001A", "Z00", "C34.1", "U07.1"])
def test_icd10_codes_accepted(code: str) -> None:
    assert domain.check_icd10(code) == code.strip().upper()


@pytest.mark.parametrize("code", ["", "I2", "I200", "120.0", "I20.", "I20.12345", "K99", "H99.1", "E95", "P97"])
def test_icd10_codes_refused_with_the_field_named(code: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        domain.check_icd10(code)
    assert refused.value.reason == "referral-diagnosis"
    assert "diagnosis.code" in refused.value.message


@pytest.mark.parametrize(
    ("origin", "target", "expected"),
    [
        ("community", "tertiary", "up"),
        ("community", "secondary", "up"),
        ("tertiary", "community", "down"),
        ("secondary", "secondary", "lateral"),
        ("", "tertiary", ""),
        ("community", "hospital", ""),
    ],
)
def test_direction_follows_the_tiers(origin: str, target: str, expected: str) -> None:
    assert directory.direction(origin, target) == expected


def test_attachment_limits() -> None:
    domain.check_attachments([domain.MAX_DOCUMENT_BYTES] * 5)
    for sizes in ([1] * (domain.MAX_DOCUMENTS + 1), [domain.MAX_DOCUMENT_BYTES + 1], [domain.MAX_DOCUMENT_BYTES] * 6):
        with pytest.raises(InvalidArgument):
            domain.check_attachments(sizes)


def test_deadlines_by_urgency_service_and_configuration() -> None:
    defaults = DeadlinePolicy.parse("")
    assert defaults("accept", {"urgency": "emergency"}) == datetime.timedelta(minutes=30)
    assert defaults("accept", {"urgency": "urgent"}) == datetime.timedelta(hours=24)
    assert defaults("accept", {}) == datetime.timedelta(hours=72)
    assert defaults("follow-up", {"direction": "up"}) is None
    assert defaults("follow-up", {"direction": "down"}) == datetime.timedelta(days=7)
    configured = DeadlinePolicy.parse('{"outcome/admission": {"routine": 86400}, "appointment": {"routine": 0}}')
    assert configured("outcome", {"service": "admission"}) == datetime.timedelta(days=1)
    assert configured("outcome", {"service": "outpatient"}) == datetime.timedelta(days=30)
    assert configured("appointment", {}) is None
    for bad in ('{"accept": {"soon": 1}}', '{"lunch": {"routine": 1}}', "[1]", "{", '{"accept": {"routine": -1}}'):
        with pytest.raises(InvalidArgument):
            DeadlinePolicy.parse(bad)


def _facts(**fields: object) -> domain.ReferralFacts:
    base: dict[str, object] = {
        "origin": "c1",
        "target": "t1",
        "direction": "up",
        "tier_pair": "community->tertiary",
        "state": "requested",
        "created": T0,
    }
    return domain.ReferralFacts(**{**base, **fields})  # type: ignore[arg-type]


def test_statistics_of_a_known_set() -> None:
    hour = datetime.timedelta(hours=1)
    items = [
        _facts(
            state="closed",
            accepted=T0 + 2 * hour,
            scheduled=T0 + 10 * hour,
            completed=T0 + 50 * hour,
            closed=True,
            decided=True,
        ),
        _facts(state="completed", accepted=T0 + 4 * hour, completed=T0 + 30 * hour, decided=True, breaches=["outcome"]),
        _facts(state="rejected", decided=True),
        _facts(state="accepted", accepted=T0 + 20 * hour, decided=True, breaches=["accept", "appointment"]),
        _facts(state="cancelled", origin="t1", target="c1", direction="down", tier_pair="tertiary->community"),
    ]
    stats = domain.statistics_of(items)
    assert stats.total == 5
    assert stats.by_direction == {"up": 4, "down": 1}
    assert stats.by_tier_pair == {"community->tertiary": 4, "tertiary->community": 1}
    assert stats.acceptance_rate == pytest.approx(3 / 4)
    assert stats.durations["accept"] == (3, 4.0, 20.0)
    assert stats.durations["outcome"] == (2, 40.0, 50.0)
    assert stats.loop_closure_rate == 0.5
    assert (stats.breaches, stats.breaches_by_clock) == (3, {"outcome": 1, "accept": 1, "appointment": 1})
    assert stats.by_organization_month[("c1", "2026-12")] == {"sent": 4, "closed": 1, "received": 1, "breaches": 0}
    assert stats.by_organization_month[("t1", "2026-12")]["breaches"] == 3
