"""The referral workflow's transition table (pure: no I/O), applied by the shared workflow engine
(services/shared/workflow). States follow FHIR Task, business statuses HL7 BSeR's
TaskBusinessStatusCS where it has a code, IHE 360X's closed loop and WS/T 790.16's flow
(application → review → response → arrival → record upload).

    origin (O: the referring organisation)   target (T: the receiving organisation)

    REQUESTED --receive T--> RECEIVED
    REQUESTED / RECEIVED --hold T--> ON_HOLD --supply O--> RECEIVED   (accept clock paused meanwhile)
    REQUESTED / RECEIVED --accept T--> ACCEPTED          (grant to T; first candidate to accept wins)
    REQUESTED / RECEIVED / ON_HOLD --reject T (coded reason + advice)--> REJECTED
    ACCEPTED / NO_SHOW --schedule T (slot or bed)--> SCHEDULED
    SCHEDULED --arrive T--> ARRIVED --start T--> IN_PROGRESS
    SCHEDULED --no-show T--> NO_SHOW
    ACCEPTED .. IN_PROGRESS --note T--> (same state: an interim note)
    ARRIVED / IN_PROGRESS (ACCEPTED for a down-referral) --complete T (outcome document)--> COMPLETED
    COMPLETED --acknowledge O--> CLOSED                   (the loop is closed)
    REQUESTED / RECEIVED / ON_HOLD / ACCEPTED / NO_SHOW --cancel O--> CANCELLED
    SCHEDULED --request-cancel O--> CANCEL_REQUESTED --confirm-cancel T--> CANCELLED

The grant: given on accept, closed on complete (end = completion + the region's grace), revoked on
cancel / confirm-cancel. Clocks (durations per urgency and requested service, services/referral/
deadlines.py): accept (from creation), appointment and outcome (from acceptance), follow-up (from
acceptance of a down-referral, stopped by its first follow-up done).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

from hie.referral.v1 import referral_pb2
from services.shared.consent_grants import GrantEffect
from services.shared.errors import FailedPrecondition, InvalidArgument
from services.shared.workflow.engine import ALL_CLOCKS
from services.shared.workflow.machine import ClockEffect, Decision, Machine, Transition

REQUESTED = referral_pb2.REFERRAL_STATE_REQUESTED
RECEIVED = referral_pb2.REFERRAL_STATE_RECEIVED
ON_HOLD = referral_pb2.REFERRAL_STATE_ON_HOLD
ACCEPTED = referral_pb2.REFERRAL_STATE_ACCEPTED
REJECTED = referral_pb2.REFERRAL_STATE_REJECTED
SCHEDULED = referral_pb2.REFERRAL_STATE_SCHEDULED
ARRIVED = referral_pb2.REFERRAL_STATE_ARRIVED
IN_PROGRESS = referral_pb2.REFERRAL_STATE_IN_PROGRESS
NO_SHOW = referral_pb2.REFERRAL_STATE_NO_SHOW
COMPLETED = referral_pb2.REFERRAL_STATE_COMPLETED
CLOSED = referral_pb2.REFERRAL_STATE_CLOSED
CANCELLED = referral_pb2.REFERRAL_STATE_CANCELLED
CANCEL_REQUESTED = referral_pb2.REFERRAL_STATE_CANCEL_REQUESTED
# States in which the receiving organisation holds a grant.
GRANTED = frozenset({ACCEPTED, SCHEDULED, ARRIVED, IN_PROGRESS, NO_SHOW, CANCEL_REQUESTED})
# States from which nothing moves any more.
TERMINAL = frozenset({REJECTED, CLOSED, CANCELLED})
OPEN_BEFORE_ACCEPT = frozenset({REQUESTED, RECEIVED, ON_HOLD})

# Coded rejection reasons (NHS e-RS style), with the advice a referrer gets by default.
REJECTION_CODES = {
    "duplicate": "已有同一患者的转诊在处理中，请勿重复提交",
    "inappropriate": "转诊不适宜本院本科室，请参考建议另选机构",
    "incomplete": "转诊资料不完整，请补充检查结果后重新提交",
    "no-capacity": "本院暂无接诊能力（号源/床位已满），请另选机构或稍后再转",
    "patient-choice": "患者本人选择不转诊或另选机构",
}

# Business statuses: BSeR TaskBusinessStatusCS codes, the exchange's own words where it has none.
BSER_SYSTEM = "http://hl7.org/fhir/us/bser/CodeSystem/TaskBusinessStatusCS"
LOCAL_STATUS_SYSTEM = "urn:hie:referral-business-status"
BUSINESS_STATUS = {
    "2.0": "Service Request Created",
    "3.0": "Service Request Accepted",
    "4.0": "Service Request Declined",
    "5.2": "Service Request Cancellation Requested",
    "5.1.1": "Service Request Event Scheduled",
    "5.1.2": "Scheduled Service Request Event Unattended",
    "6.0": "Service Request Fulfillment Cancelled",
    "7.0": "Service Request Fulfillment Completed",
    "received": "Received by the target",
    "on-hold": "More information requested from the referrer",
    "arrived": "Patient arrived",
    "in-progress": "Care in progress",
    "loop-closed": "Outcome acknowledged by the referrer",
}


class Party(StrEnum):
    REQUESTER = "requester"
    TARGET = "target"


def state_name(state: int) -> str:
    return referral_pb2.ReferralState.Name(state).removeprefix("REFERRAL_STATE_").lower()  # type: ignore[arg-type]


def _coded_rejection(facts: Mapping[str, object]) -> None:
    if facts.get("rejection_code") not in REJECTION_CODES:
        raise InvalidArgument(
            f"rejection_code must be one of {', '.join(REJECTION_CODES)}", reason="referral-rejection-code"
        )


def _booking(facts: Mapping[str, object]) -> None:
    if facts.get("service") == "admission":
        if not facts.get("bed_department"):
            raise InvalidArgument("an admission is scheduled with a bed: bed_department", reason="referral-bed")
    elif not facts.get("slot_id"):
        raise InvalidArgument("scheduling needs a slot: slot_id", reason="referral-slot")


def _note(facts: Mapping[str, object]) -> None:
    if not str(facts.get("reason") or "").strip():
        raise InvalidArgument("an interim note needs its text: reason", reason="referral-note")


def _outcome(facts: Mapping[str, object]) -> None:
    if not facts.get("outcome_document_id"):
        raise InvalidArgument(
            "completing needs the outcome document: outcome_document_id", reason="referral-outcome-missing"
        )
    if facts.get("state") == ACCEPTED and facts.get("direction") != "down":
        raise FailedPrecondition(
            "a referral in state accepted cannot be moved by complete before the patient arrived "
            "(only a down-referral completes from accepted)",
            reason="referral-state",
        )
    if facts.get("follow_ups_pending") and not facts.get("follow_up_done"):
        raise FailedPrecondition(
            "a down-referral completes after its first follow-up is done", reason="referral-follow-up-pending"
        )


_STOP_ALL = ClockEffect(stop=(ALL_CLOCKS,))
MACHINE = Machine(
    kind="referral",
    transitions={
        t.name: t
        for t in (
            Transition("receive", frozenset({REQUESTED}), RECEIVED, Party.TARGET, business_status="received"),
            Transition(
                "hold",
                frozenset({REQUESTED, RECEIVED}),
                ON_HOLD,
                Party.TARGET,
                business_status="on-hold",
                clocks=ClockEffect(pause=("accept",)),
            ),
            Transition(
                "supply",
                frozenset({ON_HOLD}),
                RECEIVED,
                Party.REQUESTER,
                business_status="received",
                clocks=ClockEffect(resume=("accept",)),
            ),
            Transition(
                "accept",
                frozenset({REQUESTED, RECEIVED}),
                ACCEPTED,
                Party.TARGET,
                grant=GrantEffect.GRANT,
                business_status="3.0",
                clocks=ClockEffect(stop=("accept",), start=("appointment", "outcome", "follow-up")),
            ),
            Transition(
                "reject",
                OPEN_BEFORE_ACCEPT,
                REJECTED,
                Party.TARGET,
                business_status="4.0",
                clocks=_STOP_ALL,
                guard=_coded_rejection,
            ),
            Transition(
                "schedule",
                frozenset({ACCEPTED, NO_SHOW}),
                SCHEDULED,
                Party.TARGET,
                business_status="5.1.1",
                clocks=ClockEffect(stop=("appointment",)),
                guard=_booking,
            ),
            Transition("arrive", frozenset({SCHEDULED}), ARRIVED, Party.TARGET, business_status="arrived"),
            Transition(
                "no-show",
                frozenset({SCHEDULED}),
                NO_SHOW,
                Party.TARGET,
                business_status="5.1.2",
                clocks=ClockEffect(start=("appointment",)),
            ),
            Transition("start", frozenset({ARRIVED}), IN_PROGRESS, Party.TARGET, business_status="in-progress"),
            Transition(
                "note",
                frozenset({ACCEPTED, SCHEDULED, ARRIVED, IN_PROGRESS}),
                0,
                Party.TARGET,
                self_loop=True,
                guard=_note,
            ),
            Transition(
                "complete",
                frozenset({ACCEPTED, ARRIVED, IN_PROGRESS}),
                COMPLETED,
                Party.TARGET,
                grant=GrantEffect.CLOSE,
                business_status="7.0",
                clocks=ClockEffect(stop=("outcome", "appointment")),
                guard=_outcome,
            ),
            Transition(
                "acknowledge",
                frozenset({COMPLETED}),
                CLOSED,
                Party.REQUESTER,
                business_status="loop-closed",
                clocks=_STOP_ALL,
            ),
            Transition(
                "cancel",
                frozenset({REQUESTED, RECEIVED, ON_HOLD, ACCEPTED, NO_SHOW}),
                CANCELLED,
                Party.REQUESTER,
                grant=GrantEffect.REVOKE,
                business_status="6.0",
                clocks=_STOP_ALL,
            ),
            Transition(
                "request-cancel", frozenset({SCHEDULED}), CANCEL_REQUESTED, Party.REQUESTER, business_status="5.2"
            ),
            Transition(
                "confirm-cancel",
                frozenset({CANCEL_REQUESTED}),
                CANCELLED,
                Party.TARGET,
                grant=GrantEffect.REVOKE,
                business_status="6.0",
                clocks=_STOP_ALL,
            ),
            # A candidate declining while other candidates remain: recorded, the referral stays.
            Transition("decline", frozenset({REQUESTED, RECEIVED}), 0, Party.TARGET, self_loop=True),
        )
    },
    state_name=state_name,
    granted=GRANTED,
    side_labels={Party.REQUESTER: "referring", Party.TARGET: "receiving"},
)
MOVES = tuple(MACHINE.transitions)


def move(name: str, *, state: int, caller_party: Party, facts: Mapping[str, object] | None = None) -> Decision:
    """The move `name` by `caller_party` from `state`; PermissionDenied (`referral-party`) for the
    wrong party, FailedPrecondition (`referral-state`) when the state does not allow it."""
    return MACHINE.decide(name, state=state, side=caller_party, facts=facts)
