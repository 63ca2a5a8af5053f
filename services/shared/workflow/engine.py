"""The effectful part of the workflow engine: apply one decided move once.

One transaction holds everything a move causes: the compare-and-set of the item's state on its
version column (of two concurrent moves one wins, the other is refused naming the state it
lost to), the history row (who, organisation, role, when, why, the move and its request key), the
consent-grant outbox message, the audit event, the deadline clocks the move starts / pauses /
resumes / stops, and the notification of the other side (an outbox message the relay hands to the
registry's notification broker, which POSTs the signed webhook). A retried move — the same request
key, or the same move to the state it already reached — returns what is there and records nothing.
"""

from __future__ import annotations

import datetime
import json
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import grpc
from opentelemetry.trace import SpanKind
from sqlalchemy import Column, Float, Index, MetaData, String, Table, UniqueConstraint, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from hie.common.v1 import common_pb2
from hie.registry.v1 import notifications_pb2, notifications_pb2_grpc
from services.shared import transactions
from services.shared.audit_trail import Action
from services.shared.auth import Caller, PlatformCredentials
from services.shared.consent_grants import GRANT_TOPIC, GrantEffect, consent_grant_sender, grant_message
from services.shared.db import UtcDateTime, utcnow
from services.shared.errors import FailedPrecondition, error_from_rpc
from services.shared.outbox import Sender
from services.shared.process import ServiceRuntime
from services.shared.tracing import current_trace_ids, remote_parent, tracer
from services.shared.workflow.machine import ClockEffect, Decision, Machine

WORKFLOW_EVENT_TOPIC = "workflow.event"
# The name a ClockEffect uses for "every clock of the item" (a cancellation stops them all).
ALL_CLOCKS = "*"
Now = Callable[[], datetime.datetime]
# The period a named clock runs for, given the item's facts (urgency, requested service...); None: no clock.
DeadlinePolicy = Callable[[str, Mapping[str, object]], datetime.timedelta | None]


def clock_table(metadata: MetaData, name: str) -> Table:
    """A workflow kind's deadline clocks, in the service's own metadata: one row per item and
    named clock (due time; paused-at and the time remaining while on hold; fired / stopped)."""
    return Table(
        name,
        metadata,
        Column("id", String(36), primary_key=True),
        Column("item_id", String(36), nullable=False),
        Column("name", String(32), nullable=False),
        Column("started_at", UtcDateTime, nullable=False),
        Column("due_at", UtcDateTime, nullable=False),
        Column("paused_at", UtcDateTime, nullable=True),
        Column("remaining_seconds", Float, nullable=True),
        Column("fired_at", UtcDateTime, nullable=True),
        Column("stopped_at", UtcDateTime, nullable=True),
        UniqueConstraint("item_id", "name", name=f"uq_{name}_item_name"),
        Index(f"ix_{name}_due", "fired_at", "stopped_at", "due_at"),
    )


@dataclass(frozen=True)
class WorkflowTables:
    """Where a service keeps its items, their history and their clocks. The item table has `id`,
    `state` and `version` (and optionally `business_status`); the history table `id`, the item
    column `item_fk`, `from_state`, `to_state`, `move`, `organization_id`, `practitioner_id`,
    `role`, `reason`, `request_key`, `changed_at`."""

    item: Table
    history: Table
    item_fk: str
    clocks: Table


@dataclass(frozen=True)
class GrantSpec:
    """Whom a move's grant message is about (the target side, purpose, patient, documents)."""

    organization_id: str
    purpose_of_use: str
    patient: common_pb2.PatientRef
    document_ids: Sequence[str]


@dataclass(frozen=True)
class Subject:
    """The service's mapping of one item onto what the engine needs."""

    item_id: str
    state: int
    version: int
    resource_type: str
    enterprise_id: str
    origin_organization_id: str
    # The target side: one organisation, or the candidates while none has accepted.
    target_organization_ids: tuple[str, ...]
    grant: GrantSpec | None = None
    # Urgency, requested service...: what the deadline policy and the guards read.
    facts: Mapping[str, object] = field(default_factory=dict)

    def other_side(self, organization_id: str) -> list[str]:
        parties = [self.origin_organization_id, *self.target_organization_ids]
        return sorted({p for p in parties if p and p != organization_id})

    @property
    def parties(self) -> list[str]:
        return sorted({p for p in (self.origin_organization_id, *self.target_organization_ids) if p})


@dataclass(frozen=True)
class Applied:
    """The outcome of a move: its decision, the audit event ids, whether it was a retry."""

    decision: Decision
    audit_event_ids: list[str]
    repeated: bool


# Service-specific writes in the move's transaction (book a slot, link the outcome document...).
Within = Callable[[AsyncSession, Decision], Awaitable[None]]
# The caller's last write in the move's transaction, once the audit event ids are known (keep the
# first answer to an Idempotency-Key, services/shared/idempotency.py).
Answer = Callable[[AsyncSession, list[str]], Awaitable[None]]


class WorkflowEngine:
    """Applies a machine's moves to one service's tables."""

    def __init__(
        self,
        runtime: ServiceRuntime,
        machine: Machine,
        tables: WorkflowTables,
        *,
        deadlines: DeadlinePolicy | None = None,
        now: Now = utcnow,
        seal_reason: Callable[[str, str], str] | None = None,
    ) -> None:
        self._rt = runtime
        # Free text of a move (why; an interim note) sealed at rest: (history row id, text) -> stored value.
        self._seal_reason = seal_reason
        self.machine = machine
        self.tables = tables
        self.deadlines = deadlines or (lambda _name, _facts: None)
        # Injectable time source (tests move it; the deadline scanner reads the same one).
        self.now = now

    @property
    def kind(self) -> str:
        return self.machine.kind

    async def apply(
        self,
        name: str,
        *,
        subject: Subject,
        who: Caller,
        side: str,
        reason: str = "",
        request_key: str = "",
        changes: Mapping[str, object] | None = None,
        facts: Mapping[str, object] | None = None,
        within: Within | None = None,
        resolve_enterprise_id: Callable[[], Awaitable[str]] | None = None,
        answer: Answer | None = None,
    ) -> Applied:
        """Apply the move `name` by `who` (on `side`) to `subject` once (see the module docstring)."""
        if request_key and await self._already_applied(subject.item_id, name, request_key):
            return Applied(Decision(name, subject.state, subject.state, repeated=True), [], repeated=True)
        decision = self.machine.decide(name, state=subject.state, side=side, facts={**subject.facts, **(facts or {})})
        if decision.repeated:
            return Applied(decision, [], repeated=True)
        enterprise_id = subject.enterprise_id
        if resolve_enterprise_id is not None:
            # Asked only for a move that will be made (a retry costs no call to the mpi).
            enterprise_id = await resolve_enterprise_id()
        t = self.tables
        now = self.now()
        async with transactions.change(self._rt) as session:
            values: dict[str, object] = {"state": decision.to_state, "version": t.item.c.version + 1, **(changes or {})}
            if decision.business_status and "business_status" in t.item.c:
                values["business_status"] = decision.business_status
            # Only from the version the move was decided on: a concurrent move wins, this one fails.
            moved = await session.execute(
                update(t.item).where(t.item.c.id == subject.item_id, t.item.c.version == subject.version).values(values)
            )
            if moved.rowcount != 1:  # type: ignore[attr-defined]
                current = await session.scalar(select(t.item.c.state).where(t.item.c.id == subject.item_id))
                raise FailedPrecondition(
                    f"the {self.kind} changed meanwhile and is now in state "
                    f"{self.machine.state_name(int(current or 0))}; read it again",
                    reason=f"{self.kind}-state",
                )
            history_id = str(uuid.uuid4())
            await session.execute(
                t.history.insert().values(
                    {
                        "id": history_id,
                        t.item_fk: subject.item_id,
                        "from_state": decision.from_state,
                        "to_state": decision.to_state,
                        "move": name,
                        "organization_id": who.organization_id,
                        "practitioner_id": who.practitioner_id,
                        "role": who.role,
                        "reason": self._seal_reason(history_id, reason) if self._seal_reason else reason,
                        "request_key": request_key[:128],
                        "changed_at": now,
                    }
                )
            )
            if decision.grant is not GrantEffect.NONE and subject.grant is not None:
                await self._rt.outbox.add(
                    session,
                    GRANT_TOPIC,
                    grant_message(
                        decision.grant,
                        reference=f"{subject.resource_type}/{subject.item_id}",
                        organization_id=subject.grant.organization_id,
                        purpose_of_use=subject.grant.purpose_of_use,
                        patient=subject.grant.patient,
                        document_ids=subject.grant.document_ids,
                    ),
                )
            await self.apply_clocks(session, subject.item_id, decision.clocks, {**subject.facts, **(facts or {})})
            if within is not None:
                await within(session, decision)
            event_id = await self._rt.audit.record(
                session,
                caller=who,
                type=f"{self.kind}.{name}",
                action=Action.ACTION_UPDATE,
                patient_enterprise_id=enterprise_id,
                entities=[(subject.resource_type, subject.item_id)],
            )
            await self.notify(
                session,
                event_type=f"{self.kind}.{name}",
                organization_ids=subject.other_side(who.organization_id),
                resource_type=subject.resource_type,
                resource_id=subject.item_id,
                status=decision.business_status or self.machine.state_name(decision.to_state),
            )
            if answer is not None:
                await answer(session, [event_id])
        return Applied(decision, [event_id], repeated=False)

    async def _already_applied(self, item_id: str, name: str, request_key: str) -> bool:
        t = self.tables
        async with self._rt.sessions() as session:
            found = await session.scalar(
                select(t.history.c.id).where(
                    t.history.c[t.item_fk] == item_id,
                    t.history.c.move == name,
                    t.history.c.request_key == request_key[:128],
                )
            )
        return found is not None

    async def history(self, session: AsyncSession, item_id: str) -> list[Mapping[str, object]]:
        """Every move of an item, oldest first."""
        h = self.tables.history
        rows = await session.execute(
            select(h).where(h.c[self.tables.item_fk] == item_id).order_by(h.c.changed_at, h.c.id)
        )
        return [dict(r._mapping) for r in rows]

    async def apply_clocks(
        self, session: AsyncSession, item_id: str, effect: ClockEffect, facts: Mapping[str, object]
    ) -> None:
        """Start, pause, resume or stop an item's named clocks in the caller's transaction."""
        if not effect:
            return
        c = self.tables.clocks
        now = self.now()
        mine = c.c.item_id == item_id
        live = (c.c.fired_at.is_(None)) & (c.c.stopped_at.is_(None))

        def named(names: tuple[str, ...]) -> ColumnElement[bool]:
            return mine if ALL_CLOCKS in names else mine & c.c.name.in_(names)

        if effect.stop:
            await session.execute(update(c).where(named(effect.stop), live).values(stopped_at=now))
        if effect.pause:
            query = select(c.c.id, c.c.due_at).where(named(effect.pause), live, c.c.paused_at.is_(None))
            for row in (await session.execute(query)).all():
                remaining = max((row.due_at - now).total_seconds(), 0.0)
                await session.execute(
                    update(c).where(c.c.id == row.id).values(paused_at=now, remaining_seconds=remaining)
                )
        if effect.resume:
            query = select(c.c.id, c.c.remaining_seconds).where(named(effect.resume), live, c.c.paused_at.is_not(None))
            for row in (await session.execute(query)).all():
                due = now + datetime.timedelta(seconds=float(row.remaining_seconds or 0.0))
                await session.execute(
                    update(c).where(c.c.id == row.id).values(paused_at=None, remaining_seconds=None, due_at=due)
                )
        for clock in effect.start:
            period = self.deadlines(clock, facts)
            if period is None:
                continue
            # A clock started again (a second appointment) runs afresh.
            await session.execute(c.delete().where(mine, c.c.name == clock))
            await session.execute(
                c.insert().values(
                    id=str(uuid.uuid4()), item_id=item_id, name=clock, started_at=now, due_at=now + period
                )
            )

    async def clocks(self, session: AsyncSession, item_id: str) -> list[Mapping[str, object]]:
        c = self.tables.clocks
        rows = await session.execute(select(c).where(c.c.item_id == item_id).order_by(c.c.started_at, c.c.name))
        return [dict(r._mapping) for r in rows]

    async def notify(
        self,
        session: AsyncSession,
        *,
        event_type: str,
        organization_ids: Sequence[str],
        resource_type: str,
        resource_id: str,
        status: str,
    ) -> None:
        """Stage the notification of `organization_ids` (their workflow-state subscribers) in the
        caller's transaction; the trace of the move travels with it to the webhook."""
        if not organization_ids:
            return
        trace_id, span_id = current_trace_ids()
        payload = {
            "event_type": event_type,
            "organization_ids": list(organization_ids),
            "resource_type": resource_type,
            "resource_id": resource_id,
            "status": status[:32],
            "trace_id": trace_id,
            "span_id": span_id,
        }
        await self._rt.outbox.add(session, WORKFLOW_EVENT_TOPIC, json.dumps(payload).encode())


def register_relays(runtime: ServiceRuntime) -> None:
    """Register the senders of the engine's outbox topics: grant messages to consent,
    notifications to the registry's broker."""
    runtime.outbox.register(GRANT_TOPIC, consent_grant_sender(runtime.channel("consent"), runtime.credentials))
    # The registry's channel is opened on first delivery: it may start after this service.
    runtime.outbox.register(
        WORKFLOW_EVENT_TOPIC, workflow_event_sender(lambda: runtime.channel("registry"), runtime.credentials)
    )


def workflow_event_sender(channel: Callable[[], grpc.aio.Channel], credentials: PlatformCredentials) -> Sender:
    """Hands staged workflow notifications to the registry's notification broker (PublishEvent),
    under the service's platform identity, continuing each move's trace; raises until it answers."""

    async def send(payloads: Sequence[bytes]) -> None:
        stub = notifications_pb2_grpc.NotificationBrokerStub(channel())
        for payload in payloads:
            event = json.loads(payload)
            parent = remote_parent(event["trace_id"], event["span_id"]) if event.get("trace_id") else None
            with tracer.start_as_current_span("workflow.notify", context=parent, kind=SpanKind.PRODUCER):
                try:
                    await stub.PublishEvent(
                        notifications_pb2.PublishEventRequest(
                            event_type=event["event_type"],
                            organization_ids=event["organization_ids"],
                            resource_type=event["resource_type"],
                            resource_id=event["resource_id"],
                            status=event["status"],
                        ),
                        metadata=credentials.metadata(),
                        timeout=10,
                    )
                except grpc.aio.AioRpcError as exc:
                    raise error_from_rpc(exc) from None

    return send
