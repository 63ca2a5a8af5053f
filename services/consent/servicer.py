"""ConsentDecisionPoint gRPC servicer."""

from __future__ import annotations

from hie.consent.v1 import consent_pb2, consent_pb2_grpc
from services.consent import policy
from services.shared.auth import caller
from services.shared.db import utcnow
from services.shared.errors import InvalidArgument
from services.shared.process import ServiceRuntime

_MAX_ITEMS = 1000
_DECISION_TO_PROTO = {
    policy.ConsentDecision.PERMIT: consent_pb2.DECISION_PERMIT,
    policy.ConsentDecision.DENY: consent_pb2.DECISION_DENY,
}


class ConsentDecisionPointServicer(consent_pb2_grpc.ConsentDecisionPointServicer):
    def __init__(self, runtime: ServiceRuntime) -> None:
        self._rt = runtime
        self._policy = policy.RegionalPolicy.from_env()

    async def Decide(self, request: consent_pb2.DecideRequest, context: object) -> consent_pb2.DecideResponse:
        who = caller()
        purpose = who.require_purpose()
        if len(request.items) > _MAX_ITEMS:
            raise InvalidArgument(f"at most {_MAX_ITEMS} items per decision", reason="batch-too-large")
        access = policy.Requester(organization_id=who.organization_id, purpose_of_use=purpose)
        decisions = []
        now = utcnow()
        for item in request.items:
            verdict = policy.decide(
                self._policy,
                policy.PatientConsent(),
                access,
                policy.Item(
                    item_id=item.item_id,
                    source_organization_id=item.source_organization_id,
                    class_code=item.class_code,
                    type_code=item.type_code,
                    security_labels=frozenset(item.security_labels),
                ),
                now,
            )
            decisions.append(
                consent_pb2.ItemDecision(
                    item_id=verdict.item_id,
                    decision=_DECISION_TO_PROTO[verdict.decision],
                    basis=verdict.basis,
                )
            )
        return consent_pb2.DecideResponse(decisions=decisions)
