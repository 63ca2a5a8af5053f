"""Notifications (IHE DSUB) staged in the registry's outbox
in the transaction of the change, delivered by signed HTTP POSTs with the trace continued, retried
with backoff, dead-lettered after a configurable period; optionally published to NATS JetStream.

Delivery contract for receivers:

- `POST <endpoint>` with the JSON body; `X-HIE-Event-Id` is the same on every retry of one
  notification (de-duplicate by it); `X-HIE-Event-Type`; `traceparent` continues the trace of the
  change that caused it.
- `X-HIE-Signature` is a JWS compact serialisation with a detached payload (RFC 7515 Appendix F,
  `<header>..<signature>`): the signing input is the protected header and the exact body bytes
  (base64url). It is signed with the exchange's platform key (ES384, `kid` in the header,
  `typ` `hie-notification+jws`); its public key is published at
  `/api/v1/notifications/jwks.json` on the gateway.
- Under the national-algorithms option (`HIE_CRYPTO_SUITE=sm`) `X-HIE-Signature-SM2` co-signs the
  exact body bytes: hex of the DER SM2 signature (GB/T 32918.2 over SM3, signer id
  "1234567812345678"), by the platform's SM2 key (`HIE_SM2_SIGNING_KEY_FILE`, the key that
  co-signs audit checkpoints); its public key is at `/api/v1/notifications/sm2-key`.
- Any 2xx acknowledges; anything else (or no answer within the timeout) is retried.
"""

from __future__ import annotations

import datetime
import json
import uuid
from collections.abc import Sequence
from typing import Any

import httpx
import jwt
from opentelemetry.trace import SpanKind
from sqlalchemy.ext.asyncio import AsyncSession

from hie.common.v1 import common_pb2
from hie.registry.v1 import registry_pb2
from services.registry import dsub, store
from services.registry.endpoints import EndpointRefused, check_endpoint, own_ports, pinned
from services.registry.nats_publisher import NATS_TOPIC, nats_publisher
from services.registry.notify_settings import NotificationSettings
from services.shared.audit_trail import Action, Outcome
from services.shared.auth import PLATFORM, Caller
from services.shared.db import utcnow
from services.shared.keys import algorithm_for, load_private_key, public_jwk
from services.shared.metrics import NOTIFICATIONS
from services.shared.outbox import DeliveryPolicy
from services.shared.process import ServiceRuntime
from services.shared.protection.sm2 import load_or_create_signing_key
from services.shared.tracing import current_trace_ids, remote_parent, tracer

NOTIFICATION_TOPIC = "notification"


class DeliveryRefused(Exception):
    """The receiver answered with something other than 2xx."""

    def __init__(self, status: int) -> None:
        super().__init__(str(status))
        self.status = status


# Actor of the audit events of deliveries: the registry itself, acting for no user.
_RELAY = Caller(
    organization_id=PLATFORM,
    organization_type=PLATFORM,
    client_id="service:registry",
    purpose_of_use="operations",
)


class Notifier:
    """Stages notifications with a change and delivers them from the outbox."""

    def __init__(self, runtime: ServiceRuntime, settings: NotificationSettings) -> None:
        self._rt = runtime
        self.settings = settings
        self._key = load_private_key(runtime.settings.service_signing_key_file)
        self._kid = public_jwk(self._key)["kid"]
        suite = runtime.settings.crypto_suite
        self.sm2 = load_or_create_signing_key(runtime.settings.sm2_signing_key_file) if suite == "sm" else None
        self.endpoints = dsub.EndpointPolicy.parse(
            settings.endpoint_allow_list,
            settings.private_networks,
            production=runtime.settings.environment == "production",
            allow_loopback=settings.allow_loopback,
            own_ports=own_ports(runtime.settings),
        )
        self._nats = nats_publisher(settings.nats_url)
        # One client (one connection pool) for every delivery, not one per notification.
        self._http: httpx.AsyncClient | None = None
        runtime.outbox.register(
            NOTIFICATION_TOPIC,
            self._deliver,
            DeliveryPolicy(
                per_message=True,
                base_backoff=datetime.timedelta(seconds=settings.retry_base_seconds),
                max_backoff=datetime.timedelta(seconds=settings.max_backoff_seconds),
                give_up_after=datetime.timedelta(seconds=settings.dead_letter_after_seconds),
                dead_letter=self._dead_letter,
                on_attempt=self._audit_attempt,
                # A hospital's receiver that hangs holds up webhook deliveries only, never the
                # audit trail (issue 23: 5-10 s of audit lag behind one hung receiver).
                lane="webhooks",
            ),
        )
        if settings.nats_url:
            runtime.outbox.register(NATS_TOPIC, self._nats, DeliveryPolicy(lane="broker"))
            runtime.background(self._nats.close_on_exit(), name="nats-close")

    # --- staging (inside the caller's transaction) --------------------------------------------

    async def stage(
        self, session: AsyncSession, notifications: Sequence[dsub.Notification], event: dict[str, Any]
    ) -> None:
        for item in notifications:
            await self._rt.outbox.add(session, NOTIFICATION_TOPIC, item.payload())
        if self.settings.nats_url:
            await self._rt.outbox.add(session, NATS_TOPIC, json.dumps(event, ensure_ascii=False).encode())

    async def stage_document(
        self,
        session: AsyncSession,
        record: store.DocumentEntryRecord,
        refs: Sequence[common_pb2.PatientRef],
    ) -> int:
        """Notifications for a newly registered document, in its registration's transaction."""
        return await self.stage_documents(session, [record], refs)

    async def stage_documents(
        self,
        session: AsyncSession,
        records: Sequence[store.DocumentEntryRecord],
        refs: Sequence[common_pb2.PatientRef],
    ) -> int:
        """Notifications for newly registered documents of one person, in their registration's
        transaction: the live subscriptions are read once for all of them."""
        announced = [
            r
            for r in records
            if dsub.announced(confidentiality=r.confidentiality, security_labels=r.labels, status=r.status)
        ]
        if not announced:
            return 0
        now = utcnow()
        pairs = [(r.domain, r.local_id) for r in refs]
        subscriptions = await store.matching_subscriptions(
            session,
            refs=pairs,
            type_codes=sorted({code for r in announced for code in (r.type_code, r.shared_type) if code}),
            exclude_organization_id=announced[0].source_organization_id,
            now=now,
        )
        trace_id, span_id = current_trace_ids()
        staged = 0
        for record in announced:
            event_type = "document.registered" if not record.relation_type else "document.revised"
            document = {
                "document_id": record.id,
                "source_organization_id": record.source_organization_id,
                "type": {"system": record.type_system, "code": record.type_code},
                "shared_type": record.shared_type,
                "status": "current",
            }
            if record.relation_type:
                names = {
                    registry_pb2.RELATION_TYPE_REPLACES: "replaces",
                    registry_pb2.RELATION_TYPE_APPENDS: "appends",
                    registry_pb2.RELATION_TYPE_TRANSFORMS: "transforms",
                }
                document["relation"] = {"type": names[record.relation_type], "document_id": record.related_document_id}
            notifications = []
            for sub in subscriptions:
                # The type topic matched any of the set's types: this document's only.
                shared = (record.type_code, record.shared_type)
                if sub.topic == dsub.TOPIC_DOCUMENT_TYPE and sub.type_code not in shared:
                    continue
                local_ids = sorted(local for domain, local in pairs if domain == sub.organization_id)
                notifications.append(
                    dsub.notification(
                        subscription_id=sub.id,
                        organization_id=sub.organization_id,
                        endpoint_url=sub.endpoint_url,
                        topic=sub.topic,
                        event_type=event_type,
                        occurred=now,
                        subject={
                            "document": document,
                            "patient": {"domain": sub.organization_id, "local_ids": local_ids},
                        },
                        trace_id=trace_id,
                        span_id=span_id,
                        enterprise_id=record.enterprise_id,
                    )
                )
            event = {"event_id": str(uuid.uuid4()), "event_type": event_type, "document": document}
            await self.stage(session, notifications, event)
            staged += len(notifications)
        return staged

    # --- delivery (the outbox relay) -------------------------------------------------------------

    def sign(self, body: bytes) -> str:
        """A detached-payload compact JWS over the body (see the module docstring)."""
        return jwt.api_jws.encode(
            body,
            self._key,
            algorithm=algorithm_for(self._key),
            headers={"kid": self._kid, "typ": dsub.SIGNATURE_TYPE},
            is_payload_detached=True,
        )

    async def check_endpoint(self, organization_id: str, url: str, *, delivering: bool = False) -> list[str]:
        """Raise EndpointRefused unless notifications of this organisation may go to `url`."""
        return await check_endpoint(self.endpoints, organization_id, url, delivering=delivering)

    async def _deliver(self, payloads: Sequence[bytes]) -> None:
        for payload in payloads:
            item = dsub.Notification.from_payload(payload)
            # Checked again at each delivery: the allow list may have shrunk since the
            # subscription, and a host name may resolve elsewhere now (DNS rebinding).
            addresses = await self.check_endpoint(item.organization_id, item.endpoint_url, delivering=True)
            # Connect to the address just checked, not to whatever a second lookup returns.
            url, host_header, extensions = pinned(item.endpoint_url, addresses[0])
            with tracer.start_as_current_span(
                "notification.deliver", context=remote_parent(item.trace_id, item.span_id), kind=SpanKind.CLIENT
            ) as span:
                span.set_attribute("hie.notification.event_type", item.event_type)
                span.set_attribute("hie.organization_id", item.organization_id)
                trace_id, span_id = current_trace_ids()
                headers = {
                    "content-type": "application/json; charset=utf-8",
                    "x-hie-event-id": item.event_id,
                    "x-hie-event-type": item.event_type,
                    "x-hie-signature": self.sign(item.body),
                }
                if self.sm2 is not None:
                    headers["x-hie-signature-sm2"] = self.sm2.sign(item.body).hex()
                if trace_id:
                    headers["traceparent"] = f"00-{trace_id}-{span_id}-01"
                response = await self._client().post(
                    url, content=item.body, headers={**headers, **host_header}, extensions=extensions
                )
                span.set_attribute("http.response.status_code", response.status_code)
                if not 200 <= response.status_code < 300:
                    raise DeliveryRefused(response.status_code)

    def _client(self) -> httpx.AsyncClient:
        if self._http is None or self._http.is_closed:
            # Redirects are not followed: a notification goes to the endpoint that was allowed.
            self._http = httpx.AsyncClient(timeout=self.settings.timeout_seconds, follow_redirects=False)
        return self._http

    async def _audit_attempt(
        self,
        session: AsyncSession,
        message_id: str,
        payload: bytes,
        attempt: int,
        error: BaseException | None,
        dead_lettered: bool,
    ) -> None:
        """Each delivery attempt in the audit trail, staged with its outcome in the outbox's
        transaction: who was sent what notification, attempt n, answered how. Ids and status
        codes only: the body, the endpoint and exception text stay out."""
        item = dsub.Notification.from_payload(payload)
        NOTIFICATIONS.add(1, {"outcome": "delivered" if error is None else "dead-letter" if dead_lettered else "retry"})
        if error is None:
            result, outcome = "delivered", Outcome.OUTCOME_SUCCESS
        elif isinstance(error, DeliveryRefused):
            result, outcome = f"http-{error.status}", Outcome.OUTCOME_MINOR_FAILURE
        elif isinstance(error, EndpointRefused):
            result, outcome = str(error), Outcome.OUTCOME_MINOR_FAILURE
        else:
            result, outcome = type(error).__name__[:40], Outcome.OUTCOME_MINOR_FAILURE
        entities = [
            ("Notification", item.event_id),
            ("Subscription", item.subscription_id),
            ("Organization", item.organization_id),
            ("DeliveryAttempt", f"{attempt}:{result}"),
        ]
        with tracer.start_as_current_span("notification.audit", context=remote_parent(item.trace_id, item.span_id)):
            await self._rt.audit.record(
                session,
                caller=_RELAY,
                type="notification.deliver",
                action=Action.ACTION_EXECUTE,
                outcome=outcome,  # type: ignore[arg-type]
                patient_enterprise_id=item.enterprise_id,
                entities=entities,
            )
            if dead_lettered:
                await self._rt.audit.record(
                    session,
                    caller=_RELAY,
                    type="notification.dead-letter",
                    action=Action.ACTION_UPDATE,
                    outcome=Outcome.OUTCOME_SERIOUS_FAILURE,
                    patient_enterprise_id=item.enterprise_id,
                    entities=entities,
                )
        self._rt.outbox.notify()

    async def _dead_letter(
        self, session: AsyncSession, message_id: str, topic: str, payload: bytes, attempts: int, error: str
    ) -> None:
        item = dsub.Notification.from_payload(payload)
        now = utcnow()
        existing = await session.get(store.DeadLetterRecord, item.event_id)
        if existing is not None:
            await session.delete(existing)
            await session.flush()
        session.add(
            store.DeadLetterRecord(
                event_id=item.event_id,
                subscription_id=item.subscription_id,
                organization_id=item.organization_id,
                endpoint_url=item.endpoint_url,
                event_type=item.event_type,
                payload=payload,
                attempts=attempts,
                last_error=error[:200],
                created=now,
                dead_lettered=now,
            )
        )
