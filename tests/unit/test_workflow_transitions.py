"""The referral and consultation transitions the consent grant follows (pure state machines)."""

from __future__ import annotations

import pytest

from services.referral import workflow as referral
from services.shared.consent_grants import GrantEffect
from services.shared.errors import DomainError, FailedPrecondition, InvalidArgument, PermissionDenied
from services.teleconsult import workflow as teleconsult

R, T = referral.Party.REQUESTER, referral.Party.TARGET
OUTCOME = {"outcome_document_id": "doc-outcome"}
# (transition, party, from state, facts) -> (to state, grant effect) or the error reason.
REFERRAL_CASES = [
    ("receive", T, referral.REQUESTED, {}, (referral.RECEIVED, GrantEffect.NONE)),
    ("receive", R, referral.REQUESTED, {}, "referral-party"),
    ("hold", T, referral.RECEIVED, {}, (referral.ON_HOLD, GrantEffect.NONE)),
    ("supply", R, referral.ON_HOLD, {}, (referral.RECEIVED, GrantEffect.NONE)),
    ("supply", T, referral.ON_HOLD, {}, "referral-party"),
    ("accept", T, referral.REQUESTED, {}, (referral.ACCEPTED, GrantEffect.GRANT)),
    ("accept", T, referral.RECEIVED, {}, (referral.ACCEPTED, GrantEffect.GRANT)),
    ("accept", R, referral.REQUESTED, {}, "referral-party"),
    ("accept", T, referral.ACCEPTED, {}, (referral.ACCEPTED, GrantEffect.NONE)),  # a retry
    ("accept", T, referral.CANCELLED, {}, "referral-state"),
    ("accept", T, referral.ON_HOLD, {}, "referral-state"),
    ("reject", T, referral.REQUESTED, {"rejection_code": "no-capacity"}, (referral.REJECTED, GrantEffect.NONE)),
    ("reject", T, referral.REQUESTED, {}, "referral-rejection-code"),
    ("reject", T, referral.REQUESTED, {"rejection_code": "busy"}, "referral-rejection-code"),
    ("reject", T, referral.ACCEPTED, {"rejection_code": "duplicate"}, "referral-state"),
    ("schedule", T, referral.ACCEPTED, {"slot_id": "s1"}, (referral.SCHEDULED, GrantEffect.NONE)),
    ("schedule", T, referral.ACCEPTED, {}, "referral-slot"),
    ("schedule", T, referral.ACCEPTED, {"service": "admission"}, "referral-bed"),
    ("schedule", T, referral.NO_SHOW, {"slot_id": "s2"}, (referral.SCHEDULED, GrantEffect.NONE)),
    ("schedule", R, referral.ACCEPTED, {"slot_id": "s1"}, "referral-party"),
    ("arrive", T, referral.SCHEDULED, {}, (referral.ARRIVED, GrantEffect.NONE)),
    ("arrive", T, referral.ACCEPTED, {}, "referral-state"),
    ("no-show", T, referral.SCHEDULED, {}, (referral.NO_SHOW, GrantEffect.NONE)),
    ("start", T, referral.ARRIVED, {}, (referral.IN_PROGRESS, GrantEffect.NONE)),
    ("note", T, referral.IN_PROGRESS, {"reason": "病情稳定"}, (referral.IN_PROGRESS, GrantEffect.NONE)),
    ("note", T, referral.IN_PROGRESS, {}, "referral-note"),
    ("note", T, referral.REQUESTED, {"reason": "x"}, "referral-state"),
    ("complete", T, referral.ARRIVED, OUTCOME, (referral.COMPLETED, GrantEffect.CLOSE)),
    ("complete", T, referral.IN_PROGRESS, OUTCOME, (referral.COMPLETED, GrantEffect.CLOSE)),
    ("complete", T, referral.ARRIVED, {}, "referral-outcome-missing"),
    ("complete", T, referral.ACCEPTED, OUTCOME, "referral-state"),
    ("complete", T, referral.ACCEPTED, {**OUTCOME, "direction": "down"}, (referral.COMPLETED, GrantEffect.CLOSE)),
    (
        "complete",
        T,
        referral.ACCEPTED,
        {**OUTCOME, "direction": "down", "follow_ups_pending": True},
        "referral-follow-up-pending",
    ),
    ("complete", T, referral.REQUESTED, OUTCOME, "referral-state"),
    ("complete", R, referral.ARRIVED, OUTCOME, "referral-party"),
    ("acknowledge", R, referral.COMPLETED, {}, (referral.CLOSED, GrantEffect.NONE)),
    ("acknowledge", T, referral.COMPLETED, {}, "referral-party"),
    ("acknowledge", R, referral.ARRIVED, {}, "referral-state"),
    ("cancel", R, referral.REQUESTED, {}, (referral.CANCELLED, GrantEffect.NONE)),
    ("cancel", R, referral.ACCEPTED, {}, (referral.CANCELLED, GrantEffect.REVOKE)),
    ("cancel", R, referral.SCHEDULED, {}, "referral-state"),  # needs the target's confirmation
    ("cancel", R, referral.COMPLETED, {}, "referral-state"),
    ("cancel", T, referral.ACCEPTED, {}, "referral-party"),
    ("request-cancel", R, referral.SCHEDULED, {}, (referral.CANCEL_REQUESTED, GrantEffect.NONE)),
    ("confirm-cancel", T, referral.CANCEL_REQUESTED, {}, (referral.CANCELLED, GrantEffect.REVOKE)),
    ("confirm-cancel", R, referral.CANCEL_REQUESTED, {}, "referral-party"),
]


@pytest.mark.parametrize(("name", "party", "state", "facts", "expected"), REFERRAL_CASES)
def test_referral_transitions(
    name: str, party: referral.Party, state: int, facts: dict[str, object], expected: tuple[int, GrantEffect] | str
) -> None:
    if isinstance(expected, str):
        with pytest.raises(DomainError) as refused:
            referral.move(name, state=state, caller_party=party, facts=facts)
        assert refused.value.reason == expected
        if expected == "referral-state":
            assert referral.state_name(state) in refused.value.message
        return
    moved = referral.move(name, state=state, caller_party=party, facts=facts)
    assert (moved.to_state, moved.grant) == expected
    assert moved.repeated == (state == expected[0] and name != "note")


C, Q = teleconsult.Party.CONSULTANT, teleconsult.Party.REQUESTER
# Facts that satisfy every guard (consent recorded, asynchronous, coded decline, a report).
FACTS = {"informed_consent": True, "mode": 1, "decline_code": "no-capacity", "report": True}
INTERACTIVE = {**FACTS, "mode": teleconsult.INTERACTIVE}
CONSULTATION_CASES = [
    ("record-consent", Q, teleconsult.REQUESTED, (teleconsult.REQUESTED, GrantEffect.NONE)),
    ("record-consent", C, teleconsult.REQUESTED, "consultation-party"),
    ("record-consent", Q, teleconsult.ASSIGNED, "consultation-state"),
    ("accept", C, teleconsult.REQUESTED, (teleconsult.ASSIGNED, GrantEffect.GRANT)),
    ("accept", Q, teleconsult.REQUESTED, "consultation-party"),
    ("accept", C, teleconsult.CANCELLED, "consultation-state"),
    ("decline", C, teleconsult.REQUESTED, (teleconsult.DECLINED, GrantEffect.NONE)),
    ("decline", C, teleconsult.ASSIGNED, "consultation-state"),
    ("start-review", C, teleconsult.ASSIGNED, (teleconsult.IN_REVIEW, GrantEffect.NONE)),
    ("request-information", C, teleconsult.IN_REVIEW, (teleconsult.INFORMATION_REQUESTED, GrantEffect.NONE)),
    ("request-information", Q, teleconsult.IN_REVIEW, "consultation-party"),
    ("provide-information", Q, teleconsult.INFORMATION_REQUESTED, (teleconsult.IN_REVIEW, GrantEffect.GRANT)),
    ("provide-information", C, teleconsult.INFORMATION_REQUESTED, "consultation-party"),
    ("preliminary", C, teleconsult.IN_REVIEW, (teleconsult.REPORT_PRELIMINARY, GrantEffect.NONE)),
    ("sign", C, teleconsult.REPORT_PRELIMINARY, (teleconsult.REPORT_FINAL, GrantEffect.NONE)),
    ("sign", C, teleconsult.IN_SESSION, (teleconsult.REPORT_FINAL, GrantEffect.NONE)),
    ("sign", C, teleconsult.REQUESTED, "consultation-state"),
    ("amend", C, teleconsult.REPORT_FINAL, (teleconsult.REPORT_FINAL, GrantEffect.NONE)),
    ("amend", C, teleconsult.CLOSED, "consultation-state"),
    ("close", Q, teleconsult.REPORT_FINAL, (teleconsult.CLOSED, GrantEffect.CLOSE)),
    ("close", C, teleconsult.REPORT_FINAL, "consultation-party"),
    ("cancel", Q, teleconsult.REQUESTED, (teleconsult.CANCELLED, GrantEffect.NONE)),
    ("cancel", Q, teleconsult.ASSIGNED, (teleconsult.CANCELLED, GrantEffect.REVOKE)),
    ("cancel", Q, teleconsult.IN_SESSION, (teleconsult.CANCELLED, GrantEffect.REVOKE)),
    ("cancel", Q, teleconsult.REPORT_PRELIMINARY, (teleconsult.CANCELLED, GrantEffect.REVOKE)),
    ("cancel", C, teleconsult.ASSIGNED, "consultation-party"),
    # Cancelled by the requester only before a final report.
    ("cancel", Q, teleconsult.REPORT_FINAL, "consultation-state"),
    ("cancel", Q, teleconsult.CLOSED, "consultation-state"),
]


@pytest.mark.parametrize(("name", "party", "state", "expected"), CONSULTATION_CASES)
def test_consultation_transitions(
    name: str, party: teleconsult.Party, state: int, expected: tuple[int, GrantEffect] | str
) -> None:
    if isinstance(expected, str):
        with pytest.raises((PermissionDenied, FailedPrecondition)) as refused:
            teleconsult.move(name, state=state, caller_party=party, facts=FACTS)
        assert refused.value.reason == expected
        return
    moved = teleconsult.move(name, state=state, caller_party=party, facts=FACTS)
    assert (moved.to_state, moved.grant) == expected


@pytest.mark.parametrize(
    ("name", "state", "facts", "reason"),
    [
        ("accept", teleconsult.REQUESTED, {**FACTS, "informed_consent": False}, "consultation-consent-missing"),
        ("decline", teleconsult.REQUESTED, {**FACTS, "decline_code": "busy"}, "consultation-decline-code"),
        ("schedule", teleconsult.ASSIGNED, FACTS, "consultation-mode"),
        ("start-review", teleconsult.ASSIGNED, INTERACTIVE, "consultation-mode"),
        ("sign", teleconsult.IN_REVIEW, {**FACTS, "report": False}, "consultation-report-invalid"),
    ],
)
def test_consultation_guards(name: str, state: int, facts: dict[str, object], reason: str) -> None:
    with pytest.raises((FailedPrecondition, InvalidArgument)) as refused:
        teleconsult.move(name, state=state, caller_party=C, facts=facts)
    assert refused.value.reason == reason


def test_scheduling_is_for_interactive_consultations() -> None:
    moved = teleconsult.move("schedule", state=teleconsult.ASSIGNED, caller_party=C, facts=INTERACTIVE)
    assert moved.to_state == teleconsult.SCHEDULED


def test_more_information_pauses_and_resumes_the_turnaround_clock() -> None:
    asked = teleconsult.move("request-information", state=teleconsult.IN_REVIEW, caller_party=C, facts=FACTS)
    answered = teleconsult.move(
        "provide-information", state=teleconsult.INFORMATION_REQUESTED, caller_party=Q, facts=FACTS
    )
    signed = teleconsult.move("sign", state=teleconsult.IN_REVIEW, caller_party=C, facts=FACTS)
    assert asked.clocks.pause == (teleconsult.TURNAROUND,)
    assert answered.clocks.resume == (teleconsult.TURNAROUND,)
    assert signed.clocks.stop == ("*",)
