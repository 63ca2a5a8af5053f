"""The consultation transition table (pure: no I/O), applied by the shared workflow engine
(services/shared/workflow). After 远程医疗服务管理规范(试行): the inviting side (requester) keeps
the decision — it records the patient's informed consent, may cancel until a final report and
closes the consultation; the invited side (consultant) accepts or declines, schedules, reviews,
asks for more information and signs the report.

    REQUESTED --record-consent (requester, stays)
    REQUESTED --accept (consultant; needs the informed consent)--> ASSIGNED          grant
    REQUESTED --decline (consultant; coded reason)--> DECLINED
    ASSIGNED --schedule (consultant; interactive; a slot per participant)--> SCHEDULED
    ASSIGNED --start-review (consultant; asynchronous)--> IN_REVIEW
    SCHEDULED --start-session (consultant)--> IN_SESSION
    ASSIGNED / IN_REVIEW / IN_SESSION --request-information (consultant)--> INFORMATION_REQUESTED
                                                                          (turnaround pauses)
    INFORMATION_REQUESTED --provide-information (requester)--> IN_REVIEW (resumes; grant widened)
    IN_REVIEW / IN_SESSION --preliminary (consultant)--> REPORT_PRELIMINARY
    IN_REVIEW / IN_SESSION / REPORT_PRELIMINARY --sign (consultant)--> REPORT_FINAL  (clock stops)
    REPORT_FINAL --amend (consultant, stays: a new report version)
    REPORT_FINAL --close (requester)--> CLOSED                                       grant ends
    any state before REPORT_FINAL --cancel (requester)--> CANCELLED                  grant revoked

Business status (FHIR Task.businessStatus) names each step; the turnaround clock starts when the
request is made (services/teleconsult/deadlines.py gives its period by type and urgency).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

from hie.teleconsult.v1 import teleconsult_pb2
from services.shared.consent_grants import GrantEffect
from services.shared.errors import FailedPrecondition, InvalidArgument
from services.shared.workflow.engine import ALL_CLOCKS
from services.shared.workflow.machine import ClockEffect, Decision, Machine, Transition

REQUESTED = teleconsult_pb2.CONSULTATION_STATE_REQUESTED
ASSIGNED = teleconsult_pb2.CONSULTATION_STATE_ASSIGNED
SCHEDULED = teleconsult_pb2.CONSULTATION_STATE_SCHEDULED
IN_SESSION = teleconsult_pb2.CONSULTATION_STATE_IN_SESSION
IN_REVIEW = teleconsult_pb2.CONSULTATION_STATE_IN_REVIEW
INFORMATION_REQUESTED = teleconsult_pb2.CONSULTATION_STATE_INFORMATION_REQUESTED
REPORT_PRELIMINARY = teleconsult_pb2.CONSULTATION_STATE_REPORT_PRELIMINARY
REPORT_FINAL = teleconsult_pb2.CONSULTATION_STATE_REPORT_FINAL
CLOSED = teleconsult_pb2.CONSULTATION_STATE_CLOSED
DECLINED = teleconsult_pb2.CONSULTATION_STATE_DECLINED
CANCELLED = teleconsult_pb2.CONSULTATION_STATE_CANCELLED

TURNAROUND = "turnaround"
# States in which the consultant organisation holds a grant.
_GRANTED = frozenset({ASSIGNED, SCHEDULED, IN_SESSION, IN_REVIEW, INFORMATION_REQUESTED, REPORT_PRELIMINARY})
OPEN = frozenset({REQUESTED, *_GRANTED})
FINISHED = frozenset({REPORT_FINAL, CLOSED, DECLINED, CANCELLED})
# Coded decline reasons (the consultant says why; free text goes in the reason).
DECLINE_CODES = frozenset(
    {"no-capacity", "outside-scope", "insufficient-material", "not-qualified", "patient-unsuitable"}
)
INTERACTIVE = teleconsult_pb2.CONSULTATION_MODE_INTERACTIVE


class Party(StrEnum):
    REQUESTER = "requester"
    CONSULTANT = "consultant"


def state_name(state: int) -> str:
    return teleconsult_pb2.ConsultationState.Name(state).removeprefix("CONSULTATION_STATE_").lower()  # type: ignore[arg-type]


def _needs_consent(facts: Mapping[str, object]) -> None:
    # 远程医疗服务管理规范: the patient's written informed consent before the service.
    if not facts.get("informed_consent"):
        raise FailedPrecondition(
            "record the patient's informed consent before the consultation is accepted",
            reason="consultation-consent-missing",
        )


def _coded_decline(facts: Mapping[str, object]) -> None:
    if facts.get("decline_code") not in DECLINE_CODES:
        raise InvalidArgument(
            f"a decline needs a code: one of {', '.join(sorted(DECLINE_CODES))}", reason="consultation-decline-code"
        )


def _interactive(facts: Mapping[str, object]) -> None:
    if facts.get("mode") != INTERACTIVE:
        raise FailedPrecondition("only an interactive consultation is scheduled", reason="consultation-mode")


def _asynchronous(facts: Mapping[str, object]) -> None:
    if facts.get("mode") == INTERACTIVE:
        raise FailedPrecondition("an interactive consultation is scheduled first", reason="consultation-mode")


def _has_report(facts: Mapping[str, object]) -> None:
    if not facts.get("report"):
        raise InvalidArgument("a report needs findings or an impression", reason="consultation-report-invalid")


def _t(name: str, sources: set[int], target: int, side: Party, status: str, **kw: object) -> Transition:
    return Transition(name, frozenset(sources), target, side, business_status=status, **kw)  # type: ignore[arg-type]


_STOP_ALL = ClockEffect(stop=(ALL_CLOCKS,))

MACHINE = Machine(
    kind="consultation",
    transitions={
        t.name: t
        for t in (
            _t("record-consent", {REQUESTED}, REQUESTED, Party.REQUESTER, "consent-recorded", self_loop=True),
            _t(
                "accept",
                {REQUESTED},
                ASSIGNED,
                Party.CONSULTANT,
                "assigned",
                grant=GrantEffect.GRANT,
                guard=_needs_consent,
            ),
            _t("decline", {REQUESTED}, DECLINED, Party.CONSULTANT, "declined", clocks=_STOP_ALL, guard=_coded_decline),
            _t("schedule", {ASSIGNED}, SCHEDULED, Party.CONSULTANT, "scheduled", guard=_interactive),
            _t("start-review", {ASSIGNED}, IN_REVIEW, Party.CONSULTANT, "in-review", guard=_asynchronous),
            _t("start-session", {SCHEDULED}, IN_SESSION, Party.CONSULTANT, "in-session"),
            _t(
                "request-information",
                {ASSIGNED, IN_REVIEW, IN_SESSION},
                INFORMATION_REQUESTED,
                Party.CONSULTANT,
                "information-requested",
                clocks=ClockEffect(pause=(TURNAROUND,)),
            ),
            _t(
                "provide-information",
                {INFORMATION_REQUESTED},
                IN_REVIEW,
                Party.REQUESTER,
                "information-provided",
                # The grant is sent again with the documents the answer added.
                grant=GrantEffect.GRANT,
                clocks=ClockEffect(resume=(TURNAROUND,)),
            ),
            _t(
                "preliminary",
                {IN_REVIEW, IN_SESSION},
                REPORT_PRELIMINARY,
                Party.CONSULTANT,
                "report-preliminary",
                guard=_has_report,
            ),
            _t(
                "sign",
                {IN_REVIEW, IN_SESSION, REPORT_PRELIMINARY},
                REPORT_FINAL,
                Party.CONSULTANT,
                "report-final",
                clocks=_STOP_ALL,
                guard=_has_report,
            ),
            _t(
                "amend",
                {REPORT_FINAL},
                REPORT_FINAL,
                Party.CONSULTANT,
                "report-amended",
                self_loop=True,
                guard=_has_report,
            ),
            _t("close", {REPORT_FINAL}, CLOSED, Party.REQUESTER, "closed", grant=GrantEffect.CLOSE),
            _t(
                "cancel",
                set(OPEN),
                CANCELLED,
                Party.REQUESTER,
                "cancelled",
                grant=GrantEffect.REVOKE,
                clocks=_STOP_ALL,
            ),
        )
    },
    state_name=state_name,
    granted=_GRANTED,
    side_labels={Party.REQUESTER: "requesting", Party.CONSULTANT: "consultant"},
)
MOVES = frozenset(MACHINE.transitions)


def move(name: str, *, state: int, caller_party: Party, facts: Mapping[str, object] | None = None) -> Decision:
    """The move `name` by `caller_party` from `state`; PermissionDenied (`consultation-party`) for
    the wrong party, FailedPrecondition (`consultation-state`) when the state does not allow it."""
    return MACHINE.decide(name, state=state, side=caller_party, facts=facts)
