"""The referral transition table (pure: no I/O), applied by the shared workflow engine
(services/shared/workflow).

    REQUESTED --accept (target)--> ACCEPTED --complete (target)--> COMPLETED
    REQUESTED --reject (target)--> REJECTED
    REQUESTED / ACCEPTED --cancel (requester)--> CANCELLED

Scheduling and arrival (SCHEDULED, ARRIVED) are not built; a referral in either would complete
or cancel like an accepted one.
"""

from __future__ import annotations

from enum import StrEnum

from hie.referral.v1 import referral_pb2
from services.shared.consent_grants import GrantEffect
from services.shared.workflow.machine import Decision, Machine, Transition

REQUESTED = referral_pb2.REFERRAL_STATE_REQUESTED
ACCEPTED = referral_pb2.REFERRAL_STATE_ACCEPTED
REJECTED = referral_pb2.REFERRAL_STATE_REJECTED
SCHEDULED = referral_pb2.REFERRAL_STATE_SCHEDULED
ARRIVED = referral_pb2.REFERRAL_STATE_ARRIVED
COMPLETED = referral_pb2.REFERRAL_STATE_COMPLETED
CANCELLED = referral_pb2.REFERRAL_STATE_CANCELLED
# States in which the receiving organisation holds a grant.
_GRANTED = frozenset({ACCEPTED, SCHEDULED, ARRIVED})


class Party(StrEnum):
    REQUESTER = "requester"
    TARGET = "target"


def state_name(state: int) -> str:
    return referral_pb2.ReferralState.Name(state).removeprefix("REFERRAL_STATE_").lower()  # type: ignore[arg-type]


MACHINE = Machine(
    kind="referral",
    transitions={
        "accept": Transition("accept", frozenset({REQUESTED}), ACCEPTED, Party.TARGET, grant=GrantEffect.GRANT),
        "reject": Transition("reject", frozenset({REQUESTED}), REJECTED, Party.TARGET),
        "complete": Transition("complete", _GRANTED, COMPLETED, Party.TARGET, grant=GrantEffect.CLOSE),
        "cancel": Transition(
            "cancel", frozenset({REQUESTED, *_GRANTED}), CANCELLED, Party.REQUESTER, grant=GrantEffect.REVOKE
        ),
    },
    state_name=state_name,
    granted=_GRANTED,
    side_labels={Party.REQUESTER: "referring", Party.TARGET: "receiving"},
)


def move(name: str, *, state: int, caller_party: Party) -> Decision:
    """The move `name` by `caller_party` from `state`; PermissionDenied (`referral-party`) for the
    wrong party, FailedPrecondition (`referral-state`) when the state does not allow it."""
    return MACHINE.decide(name, state=state, side=caller_party)
