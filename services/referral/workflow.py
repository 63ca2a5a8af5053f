"""The referral state machine (pure: no I/O): which party may move a referral from which state
to which, and what each move does to the receiving organisation's consent grant.

    REQUESTED --accept (target)--> ACCEPTED --complete (target)--> COMPLETED
    REQUESTED --reject (target)--> REJECTED
    REQUESTED / ACCEPTED --cancel (requester)--> CANCELLED

Scheduling and arrival (SCHEDULED, ARRIVED) are not built; a referral in either would complete
or cancel like an accepted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from hie.referral.v1 import referral_pb2
from services.shared.consent_grants import GrantEffect
from services.shared.errors import FailedPrecondition, PermissionDenied

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


@dataclass(frozen=True)
class Transition:
    name: str
    sources: frozenset[int]
    target: int
    party: Party


TRANSITIONS = {
    "accept": Transition("accept", frozenset({REQUESTED}), ACCEPTED, Party.TARGET),
    "reject": Transition("reject", frozenset({REQUESTED}), REJECTED, Party.TARGET),
    "complete": Transition("complete", frozenset(_GRANTED), COMPLETED, Party.TARGET),
    "cancel": Transition("cancel", frozenset({REQUESTED, *_GRANTED}), CANCELLED, Party.REQUESTER),
}


@dataclass(frozen=True)
class Move:
    """What a transition does: the new state, or nothing when it is a retry of the last move."""

    to_state: int
    repeated: bool
    grant: GrantEffect


def move(name: str, *, state: int, caller_party: Party) -> Move:
    """The move `name` by `caller_party` from `state`; PermissionDenied for the wrong party,
    FailedPrecondition (reason `referral-state`) when the state does not allow it."""
    transition = TRANSITIONS[name]
    if caller_party is not transition.party:
        who = "receiving" if transition.party is Party.TARGET else "referring"
        raise PermissionDenied(f"only the {who} organisation may {name} a referral", reason="referral-party")
    if state == transition.target:
        # The same move again (a retry): the referral is already where it asked to go.
        return Move(state, repeated=True, grant=GrantEffect.NONE)
    if state not in transition.sources:
        raise FailedPrecondition(
            f"a referral in state {referral_pb2.ReferralState.Name(state).removeprefix('REFERRAL_STATE_').lower()} "
            f"cannot be moved by {name}",
            reason="referral-state",
        )
    if name == "accept":
        effect = GrantEffect.GRANT
    elif name == "complete":
        effect = GrantEffect.CLOSE
    elif name == "cancel" and state in _GRANTED:
        effect = GrantEffect.REVOKE
    else:
        effect = GrantEffect.NONE
    return Move(transition.target, repeated=False, grant=effect)
