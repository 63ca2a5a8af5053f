"""The consultation transition table (pure: no I/O), applied by the shared workflow engine
(services/shared/workflow).

    REQUESTED --accept (consultant)--> ASSIGNED
    REQUESTED / ASSIGNED / SCHEDULED --cancel (requester)--> CANCELLED

Scheduling, sessions and the report (SCHEDULED, IN_SESSION, REPORTED) come with the
teleconsultation issue; the report is what will close the grant (end = report + grace).
"""

from __future__ import annotations

from enum import StrEnum

from hie.teleconsult.v1 import teleconsult_pb2
from services.shared.consent_grants import GrantEffect
from services.shared.workflow.machine import Decision, Machine, Transition

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


def state_name(state: int) -> str:
    return teleconsult_pb2.ConsultationState.Name(state).removeprefix("CONSULTATION_STATE_").lower()  # type: ignore[arg-type]


MACHINE = Machine(
    kind="consultation",
    transitions={
        "accept": Transition("accept", frozenset({REQUESTED}), ASSIGNED, Party.CONSULTANT, grant=GrantEffect.GRANT),
        "cancel": Transition(
            "cancel", frozenset({REQUESTED, ASSIGNED, SCHEDULED}), CANCELLED, Party.REQUESTER, grant=GrantEffect.REVOKE
        ),
    },
    state_name=state_name,
    granted=_GRANTED,
    side_labels={Party.REQUESTER: "requesting", Party.CONSULTANT: "consultant"},
)


def move(name: str, *, state: int, caller_party: Party) -> Decision:
    """The move `name` by `caller_party` from `state`; PermissionDenied (`consultation-party`) for
    the wrong party, FailedPrecondition (`consultation-state`) when the state does not allow it."""
    return MACHINE.decide(name, state=state, side=caller_party)
