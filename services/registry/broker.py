"""NotificationBroker gRPC servicer: subscriptions (IHE DSUB), dead letters and their replay,
published events, the keys receivers verify signatures with. Staging and signed delivery (with
the delivery contract for receivers): services/registry/delivery.py; settings, endpoint policy and
NATS publishing: notify_settings.py, endpoints.py, nats_publisher.py (re-exported here)."""

from __future__ import annotations

import uuid

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from hie.common.v1 import common_pb2
from hie.registry.v1 import notifications_pb2, notifications_pb2_grpc
from services.registry import dsub, store
from services.registry.delivery import NOTIFICATION_TOPIC, DeliveryRefused, Notifier
from services.registry.endpoints import EndpointRefused, check_endpoint, own_ports, pinned
from services.registry.nats_publisher import NATS_STREAM, NATS_TOPIC
from services.registry.notify_settings import NotificationSettings
from services.shared import mpi_client, transactions
from services.shared.audit_trail import Action
from services.shared.auth import caller
from services.shared.db import utcnow
from services.shared.errors import InvalidArgument, NotFound, PermissionDenied
from services.shared.idempotency import FirstAnswers, check_key, fingerprint
from services.shared.process import ServiceRuntime
from services.shared.protection.sm2 import DEFAULT_SIGNER_ID
from services.shared.timestamps import to_datetime_or_none, to_timestamp
from services.shared.tracing import current_trace_ids

__all__ = [
    "NATS_STREAM",
    "NATS_TOPIC",
    "NOTIFICATION_TOPIC",
    "DeliveryRefused",
    "EndpointRefused",
    "NotificationBrokerServicer",
    "NotificationSettings",
    "Notifier",
    "check_endpoint",
    "own_ports",
    "pinned",
]
_SUBSCRIBERS = ("admin", "doctor", "nurse")


def _subscription_message(record: store.SubscriptionRecord) -> notifications_pb2.Subscription:
    return notifications_pb2.Subscription(
        subscription_id=record.id,
        organization_id=record.organization_id,
        topic=record.topic,  # type: ignore[arg-type]
        patient=common_pb2.PatientRef(domain=record.patient_domain, local_id=record.patient_local_id)
        if record.patient_local_id
        else None,
        type_code=record.type_code,
        endpoint_url=record.endpoint_url,
        expires=to_timestamp(record.expires),
        created=to_timestamp(record.created),
    )


def _dead_letter_message(record: store.DeadLetterRecord) -> notifications_pb2.DeadLetter:
    return notifications_pb2.DeadLetter(
        event_id=record.event_id,
        subscription_id=record.subscription_id,
        endpoint_url=record.endpoint_url,
        event_type=record.event_type,
        attempts=record.attempts,
        last_error=record.last_error,
        created=to_timestamp(record.created),
        dead_lettered=to_timestamp(record.dead_lettered),
    )


# The operation a kept first answer belongs to (services/shared/idempotency.py).
_SUBSCRIBE_OPERATION = "subscription.create"
_UNSUBSCRIBE_OPERATION = "subscription.delete"
_REPLAY_OPERATION = "notification.replay"


class NotificationBrokerServicer(notifications_pb2_grpc.NotificationBrokerServicer):
    def __init__(self, runtime: ServiceRuntime, notifier: Notifier) -> None:
        self._rt = runtime
        self._notifier = notifier
        self._answers = FirstAnswers(store.idempotent_answers)

    async def Subscribe(  # noqa: N802 - gRPC method name
        self, request: notifications_pb2.SubscribeRequest, context: object
    ) -> notifications_pb2.SubscribeResponse:
        who = caller()
        who.require_scope("DocumentReference", "r")
        who.require_role(*_SUBSCRIBERS)
        now = utcnow()
        topic = int(request.topic)
        if topic not in dsub.TOPIC_NAMES:
            raise InvalidArgument("topic must be patient-document, document-type or workflow-state", reason="topic")
        endpoint = dsub.check_endpoint(request.endpoint_url, production=self._rt.settings.environment == "production")
        expires = dsub.check_expiry(to_datetime_or_none(request.expires, request.HasField("expires")), now)
        enterprise_id = ""
        local_id = type_code = ""
        if topic == dsub.TOPIC_PATIENT_DOCUMENT:
            local_id = request.patient.local_id
            if not local_id or len(local_id) > 64:
                raise InvalidArgument("a patient local id is required", reason="patient-ref-missing")
            enterprise_id = await mpi_client.registered_person(
                self._rt, common_pb2.PatientRef(domain=who.organization_id, local_id=local_id)
            )
        elif topic == dsub.TOPIC_DOCUMENT_TYPE:
            type_code = request.type_code.strip()
            if not type_code or len(type_code) > 64:
                raise InvalidArgument("a type code is required", reason="type-code-missing")
        try:
            await self._notifier.check_endpoint(who.organization_id, endpoint)
        except EndpointRefused as refused:
            raise PermissionDenied(
                "notifications may only go to your organisation's registered endpoints", reason=str(refused)
            ) from None
        record = store.SubscriptionRecord(
            id=str(uuid.uuid4()),
            organization_id=who.organization_id,
            topic=topic,
            patient_domain=who.organization_id if local_id else "",
            patient_local_id=local_id,
            type_code=type_code,
            endpoint_url=endpoint,
            expires=expires,
            created=now,
        )
        key = check_key(request.idempotency_key.strip())
        request_fingerprint = fingerprint(_SUBSCRIBE_OPERATION, request)

        async def first_answer(session: AsyncSession) -> notifications_pb2.SubscribeResponse | None:
            if not key:
                return None
            return await self._answers.first(
                session,
                organization_id=who.organization_id,
                key=key,
                operation=_SUBSCRIBE_OPERATION,
                request_fingerprint=request_fingerprint,
                response_type=notifications_pb2.SubscribeResponse,
            )

        try:
            async with self._rt.sessions() as session, session.begin():
                if (first := await first_answer(session)) is not None:
                    # A retry: the one subscription, not a second one notifying twice.
                    return first
                session.add(record)
                await self._rt.audit.record(
                    session,
                    caller=who,
                    type="subscription.create",
                    action=Action.ACTION_CREATE,
                    patient_enterprise_id=enterprise_id,
                    entities=[("Subscription", record.id)],
                )
                answer = notifications_pb2.SubscribeResponse(subscription=_subscription_message(record))
                if key:
                    await self._answers.keep(
                        session,
                        organization_id=who.organization_id,
                        key=key,
                        operation=_SUBSCRIBE_OPERATION,
                        request_fingerprint=request_fingerprint,
                        response=answer,
                    )
        except IntegrityError:
            # A concurrent retry with the same key committed first: answer as that retry.
            async with self._rt.sessions() as session:
                if (first := await first_answer(session)) is not None:
                    return first
            raise
        self._rt.outbox.notify()
        return answer

    async def Unsubscribe(  # noqa: N802 - gRPC method name
        self, request: notifications_pb2.UnsubscribeRequest, context: object
    ) -> notifications_pb2.UnsubscribeResponse:
        who = caller()
        who.require_scope("DocumentReference", "r")
        who.require_role(*_SUBSCRIBERS)

        async def change(session: AsyncSession) -> notifications_pb2.UnsubscribeResponse:
            record = await session.get(store.SubscriptionRecord, request.subscription_id[:36])
            if record is None or record.organization_id != who.organization_id:
                raise NotFound("no such subscription", reason="subscription-not-found")
            await session.delete(record)
            await self._rt.audit.record(
                session,
                caller=who,
                type="subscription.delete",
                action=Action.ACTION_DELETE,
                entities=[("Subscription", record.id)],
            )
            return notifications_pb2.UnsubscribeResponse()

        # A retry of a keyed unsubscribe gets the first answer, not 404 for the one it removed.
        answer, replayed = await self._answers.once(
            self._rt.sessions,
            organization_id=who.organization_id,
            key=request.idempotency_key,
            operation=_UNSUBSCRIBE_OPERATION,
            request=request,
            response_type=notifications_pb2.UnsubscribeResponse,
            change=change,
        )
        if not replayed:
            self._rt.outbox.notify()
        return answer

    async def ListSubscriptions(  # noqa: N802 - gRPC method name
        self, request: notifications_pb2.ListSubscriptionsRequest, context: object
    ) -> notifications_pb2.ListSubscriptionsResponse:
        who = caller()
        who.require_scope("DocumentReference", "r")
        who.require_role(*_SUBSCRIBERS)
        async with self._rt.sessions() as session:
            records = await store.subscriptions_of(session, who.organization_id)
            return notifications_pb2.ListSubscriptionsResponse(
                subscriptions=[_subscription_message(r) for r in records]
            )

    async def PublishEvent(  # noqa: N802 - gRPC method name
        self, request: notifications_pb2.PublishEventRequest, context: object
    ) -> notifications_pb2.PublishEventResponse:
        who = caller()
        if not who.is_platform:
            raise PermissionDenied("only exchange services publish events", reason="platform-only")
        event_type = dsub.check_event_type(request.event_type)
        organizations = sorted({o[:64] for o in request.organization_ids if o})
        if not organizations:
            raise InvalidArgument("at least one organisation is required", reason="organizations-missing")
        now = utcnow()
        trace_id, span_id = current_trace_ids()
        resource = {
            "type": request.resource_type[:64],
            "id": request.resource_id[:64],
            "status": request.status[:32],
        }
        event = {"event_id": str(uuid.uuid4()), "event_type": event_type, "resource": resource}
        async with transactions.change(self._rt) as session:
            subscriptions = await store.workflow_subscriptions(session, organization_ids=organizations, now=now)
            notifications = [
                dsub.notification(
                    subscription_id=sub.id,
                    organization_id=sub.organization_id,
                    endpoint_url=sub.endpoint_url,
                    topic=sub.topic,
                    event_type=event_type,
                    occurred=now,
                    subject={"resource": resource},
                    trace_id=trace_id,
                    span_id=span_id,
                )
                for sub in subscriptions
            ]
            await self._notifier.stage(session, notifications, event)
        return notifications_pb2.PublishEventResponse(event_id=event["event_id"], notifications=len(notifications))

    async def GetSigningKeys(  # noqa: N802 - gRPC method name
        self, request: notifications_pb2.GetSigningKeysRequest, context: object
    ) -> notifications_pb2.GetSigningKeysResponse:
        """Public keys, but asked for with a member's token like everything else."""
        caller()
        sm2 = self._notifier.sm2
        if sm2 is None:
            return notifications_pb2.GetSigningKeysResponse()
        return notifications_pb2.GetSigningKeysResponse(
            sm2_public_key=sm2.public.hex(), sm2_signer_id=DEFAULT_SIGNER_ID.decode()
        )

    async def ListDeadLetters(  # noqa: N802 - gRPC method name
        self, request: notifications_pb2.ListDeadLettersRequest, context: object
    ) -> notifications_pb2.ListDeadLettersResponse:
        who = caller()
        who.require_scope("DocumentReference", "r")
        who.require_role("admin")
        async with self._rt.sessions() as session:
            records = await store.dead_letters_of(session, who.organization_id, limit=500)
            return notifications_pb2.ListDeadLettersResponse(dead_letters=[_dead_letter_message(r) for r in records])

    async def ReplayDeadLetter(  # noqa: N802 - gRPC method name
        self, request: notifications_pb2.ReplayDeadLetterRequest, context: object
    ) -> notifications_pb2.ReplayDeadLetterResponse:
        who = caller()
        who.require_scope("DocumentReference", "r")
        who.require_role("admin")

        async def change(session: AsyncSession) -> notifications_pb2.ReplayDeadLetterResponse:
            record = await session.get(store.DeadLetterRecord, request.event_id[:36])
            if record is None or record.organization_id != who.organization_id:
                raise NotFound("no such dead letter", reason="dead-letter-not-found")
            # The same payload, so the same event id: a receiver that did get it de-duplicates.
            await self._rt.outbox.add(session, NOTIFICATION_TOPIC, record.payload)
            await store.delete_dead_letter(session, record.event_id)
            await self._rt.audit.record(
                session,
                caller=who,
                type="notification.replay",
                action=Action.ACTION_UPDATE,
                entities=[("Notification", record.event_id)],
            )
            return notifications_pb2.ReplayDeadLetterResponse(dead_letter=_dead_letter_message(record))

        # A keyed retry gets the first answer (one replay), not 404 for the letter it removed.
        answer, replayed = await self._answers.once(
            self._rt.sessions,
            organization_id=who.organization_id,
            key=request.idempotency_key,
            operation=_REPLAY_OPERATION,
            request=request,
            response_type=notifications_pb2.ReplayDeadLetterResponse,
            change=change,
        )
        if not replayed:
            self._rt.outbox.notify()
        return answer
