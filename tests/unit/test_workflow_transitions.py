"""The referral and consultation transitions the consent grant follows (pure state machines)."""

from __future__ import annotations

import pytest

from services.referral import workflow as referral
from services.shared.consent_grants import GrantEffect
from services.shared.errors import FailedPrecondition, PermissionDenied
from services.teleconsult import workflow as teleconsult

R, T = referral.Party.REQUESTER, referral.Party.TARGET
# (transition, party, from state) -> (to state, grant effect) or the error reason.
REFERRAL_CASES = [
    ("accept", T, referral.REQUESTED, (referral.ACCEPTED, GrantEffect.GRANT)),
    ("accept", R, referral.REQUESTED, "referral-party"),
    ("accept", T, referral.ACCEPTED, (referral.ACCEPTED, GrantEffect.NONE)),  # a retry
    ("accept", T, referral.CANCELLED, "referral-state"),
    ("reject", T, referral.REQUESTED, (referral.REJECTED, GrantEffect.NONE)),
    ("reject", T, referral.ACCEPTED, "referral-state"),
    ("complete", T, referral.ACCEPTED, (referral.COMPLETED, GrantEffect.CLOSE)),
    ("complete", T, referral.ARRIVED, (referral.COMPLETED, GrantEffect.CLOSE)),
    ("complete", T, referral.REQUESTED, "referral-state"),
    ("complete", R, referral.ACCEPTED, "referral-party"),
    ("cancel", R, referral.REQUESTED, (referral.CANCELLED, GrantEffect.NONE)),
    ("cancel", R, referral.ACCEPTED, (referral.CANCELLED, GrantEffect.REVOKE)),
    ("cancel", R, referral.COMPLETED, "referral-state"),
    ("cancel", T, referral.ACCEPTED, "referral-party"),
]


@pytest.mark.parametrize(("name", "party", "state", "expected"), REFERRAL_CASES)
def test_referral_transitions(
    name: str, party: referral.Party, state: int, expected: tuple[int, GrantEffect] | str
) -> None:
    if isinstance(expected, str):
        with pytest.raises((PermissionDenied, FailedPrecondition)) as refused:
            referral.move(name, state=state, caller_party=party)
        assert refused.value.reason == expected
        return
    moved = referral.move(name, state=state, caller_party=party)
    assert (moved.to_state, moved.grant) == expected
    assert moved.repeated == (state == expected[0])


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
