"""The consultation transitions the consent grant follows (pure: no I/O).

    REQUESTED --accept (consultant)--> ASSIGNED
    REQUESTED / ASSIGNED / SCHEDULED --cancel (requester)--> CANCELLED

Scheduling, sessions and the report (SCHEDULED, IN_SESSION, REPORTED) come with the
teleconsultation issue; the report is what will close the grant (end = report + grace).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from hie.teleconsult.v1 import teleconsult_pb2
from services.shared.consent_grants import GrantEffect
from services.shared.errors import FailedPrecondition, PermissionDenied

REQUESTED = teleconsult_pb2.CONSULTATION_STATE_REQUESTED
ASSIGNED = teleconsult_pb2.CONSULTATION_STATE_ASSIGNED
SCHEDULED = teleconsult_pb2.CONSULTATION_STATE_SCHEDULED
IN_SESSION = teleconsult_pb2.CONSULTATION_STATE_IN_SESSION
CANCELLED = teleconsult_pb2.CONSULTATION_STATE_CANCELLED
# States in which the consultant organisation holds a grant.
_GRANTED = frozenset({ASSIGNED, SCHEDULED, IN_SESSION})


class Party(StrEnum):
    REQUESTER = "requester"
    CONSULTANT = "consultant"


@dataclass(frozen=True)
class Transition:
    sources: frozenset[int]
    target: int
    party: Party


TRANSITIONS = {
    "accept": Transition(frozenset({REQUESTED}), ASSIGNED, Party.CONSULTANT),
    "cancel": Transition(frozenset({REQUESTED, ASSIGNED, SCHEDULED}), CANCELLED, Party.REQUESTER),
}


@dataclass(frozen=True)
class Move:
    to_state: int
    repeated: bool
    grant: GrantEffect


def move(name: str, *, state: int, caller_party: Party) -> Move:
    """The move `name` by `caller_party` from `state`; PermissionDenied (`consultation-party`) for
    the wrong party, FailedPrecondition (`consultation-state`) when the state does not allow it."""
    transition = TRANSITIONS[name]
    if caller_party is not transition.party:
        raise PermissionDenied(
            f"only the {transition.party.value} organisation may {name} a consultation", reason="consultation-party"
        )
    if state == transition.target:
        return Move(state, repeated=True, grant=GrantEffect.NONE)
    if state not in transition.sources:
        raise FailedPrecondition(f"a consultation in this state cannot be moved by {name}", reason="consultation-state")
    if name == "accept":
        return Move(transition.target, repeated=False, grant=GrantEffect.GRANT)
    return Move(transition.target, repeated=False, grant=GrantEffect.REVOKE if state in _GRANTED else GrantEffect.NONE)
