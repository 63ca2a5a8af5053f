"""Audit events as services record them: staged in the service's outbox in the same
transaction as the change, delivered to the audit service by the relay."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence

from opentelemetry.trace import Link, SpanKind
from sqlalchemy.ext.asyncio import AsyncSession

from hie.audit.v1 import audit_pb2, audit_pb2_grpc
from services.shared.auth import Caller, PlatformCredentials
from services.shared.db import utcnow
from services.shared.outbox import Outbox, Sender
from services.shared.timestamps import to_timestamp
from services.shared.tracing import current_trace_ids, remote_parent, remote_span_context, tracer

AUDIT_TOPIC = "audit"
Action = audit_pb2.Action
Outcome = audit_pb2.Outcome


class AuditTrail:
    """Records a service's audit events through its transactional outbox."""

    def __init__(self, outbox: Outbox, *, service: str) -> None:
        self._outbox = outbox
        self._service = service

    async def record(
        self,
        session: AsyncSession,
        *,
        caller: Caller,
        type: str,
        action: audit_pb2.Action.ValueType,
        outcome: audit_pb2.Outcome.ValueType = audit_pb2.OUTCOME_SUCCESS,
        patient_enterprise_id: str = "",
        entities: Iterable[tuple[str, str]] = (),
    ) -> str:
        """Stage one audit event in the caller's transaction; returns its event id."""
        event = self._event(caller, type, action, outcome, patient_enterprise_id, entities)
        await self._outbox.add(session, AUDIT_TOPIC, event.SerializeToString())
        return event.event_id

    async def record_now(
        self,
        *,
        caller: Caller,
        type: str,
        action: audit_pb2.Action.ValueType,
        outcome: audit_pb2.Outcome.ValueType = audit_pb2.OUTCOME_SUCCESS,
        patient_enterprise_id: str = "",
        entities: Iterable[tuple[str, str]] = (),
    ) -> str:
        """Stage one audit event committed before this returns, in a transaction of its own shared
        with the events staged concurrently (`Outbox.add_now`): the audit of a read, which changes
        nothing else. Returns its event id; the relay is woken."""
        event = self._event(caller, type, action, outcome, patient_enterprise_id, entities)
        await self._outbox.add_now(AUDIT_TOPIC, event.SerializeToString())
        return event.event_id

    def _event(
        self,
        caller: Caller,
        type: str,
        action: audit_pb2.Action.ValueType,
        outcome: audit_pb2.Outcome.ValueType,
        patient_enterprise_id: str,
        entities: Iterable[tuple[str, str]],
    ) -> audit_pb2.AuditEvent:
        trace_id, span_id = current_trace_ids()
        return audit_pb2.AuditEvent(
            event_id=str(uuid.uuid4()),
            occurred=to_timestamp(utcnow()),
            type=type,
            action=action,
            outcome=outcome,
            actor=caller.to_proto(),
            patient_enterprise_id=patient_enterprise_id,
            entities=[audit_pb2.EntityRef(type=t, id=i) for t, i in entities],
            source_address=caller.client_address,
            trace_id=trace_id,
            span_id=span_id,
            source_service=self._service,
        )


def audit_sender(stub: audit_pb2_grpc.AuditLogStub, credentials: PlatformCredentials) -> Sender:
    """Delivers outbox batches to the audit service under the service's own platform identity.

    A batch goes in one append, however many requests (traces) its events come from: the audit
    service's cost is per append (its chain lock, head and checkpoint reads, one commit), and one
    append per trace made it pay that for every read request. The relay span continues the trace
    of the batch's first event and links to the trace of every other one (OpenTelemetry's
    representation of a batch), so each exchange's trace still leads to its audit delivery.
    """

    async def send(payloads: Sequence[bytes]) -> None:
        events = [audit_pb2.AuditEvent.FromString(payload) for payload in payloads]
        origins = list(dict.fromkeys((e.trace_id, e.span_id) for e in events if e.trace_id))
        parent = remote_parent(*origins[0]) if origins else None
        links = [Link(c) for c in (remote_span_context(*origin) for origin in origins[1:]) if c]
        with tracer.start_as_current_span("audit.relay", context=parent, kind=SpanKind.PRODUCER, links=links) as span:
            span.set_attribute("hie.audit.events", len(events))
            await stub.Append(audit_pb2.AppendRequest(events=events), metadata=credentials.metadata(), timeout=10)

    return send
