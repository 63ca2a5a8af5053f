"""The referral and consultation transitions the consent grant follows (pure state machines)."""

from __future__ import annotations

import pytest

from services.referral import workflow as referral
from services.shared.consent_grants import GrantEffect
from services.shared.errors import DomainError, FailedPrecondition, PermissionDenied
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
CONSULTATION_CASES = [
    ("accept", C, teleconsult.REQUESTED, (teleconsult.ASSIGNED, GrantEffect.GRANT)),
    ("accept", Q, teleconsult.REQUESTED, "consultation-party"),
    ("accept", C, teleconsult.CANCELLED, "consultation-state"),
    ("cancel", Q, teleconsult.REQUESTED, (teleconsult.CANCELLED, GrantEffect.NONE)),
    ("cancel", Q, teleconsult.ASSIGNED, (teleconsult.CANCELLED, GrantEffect.REVOKE)),
    ("cancel", C, teleconsult.ASSIGNED, "consultation-party"),
    ("cancel", Q, teleconsult.IN_SESSION, "consultation-state"),
]


@pytest.mark.parametrize(("name", "party", "state", "expected"), CONSULTATION_CASES)
def test_consultation_transitions(
    name: str, party: teleconsult.Party, state: int, expected: tuple[int, GrantEffect] | str
) -> None:
    if isinstance(expected, str):
        with pytest.raises((PermissionDenied, FailedPrecondition)) as refused:
            teleconsult.move(name, state=state, caller_party=party)
        assert refused.value.reason == expected
        return
    moved = teleconsult.move(name, state=state, caller_party=party)
    assert (moved.to_state, moved.grant) == expected
