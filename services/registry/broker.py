"""NotificationBroker: subscriptions (IHE DSUB), notifications staged in the registry's outbox
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

import asyncio
import datetime
import ipaddress
import json
import logging
import os
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import jwt
from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry.trace import SpanKind
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from hie.common.v1 import common_pb2
from hie.registry.v1 import notifications_pb2, notifications_pb2_grpc
from services.registry import dsub, store
from services.shared import mpi_client
from services.shared.audit_trail import Action, Outcome
from services.shared.auth import PLATFORM, Caller, caller
from services.shared.config import GATEWAY_PORT, SERVICE_PORTS, Settings
from services.shared.db import utcnow
from services.shared.errors import InvalidArgument, NotFound, PermissionDenied
from services.shared.idempotency import FirstAnswers, check_key, fingerprint
from services.shared.keys import algorithm_for, load_private_key, public_jwk
from services.shared.nats_publisher import JetStreamPublisher
from services.shared.outbox import DeliveryPolicy
from services.shared.process import ServiceRuntime
from services.shared.protection.sm2 import DEFAULT_SIGNER_ID, load_or_create_signing_key
from services.shared.tracing import current_trace_ids, remote_parent, tracer

_log = logging.getLogger(__name__)
NOTIFICATION_TOPIC = "notification"
NATS_TOPIC = "nats"
NATS_STREAM = "HIE_EVENTS"
_SUBSCRIBERS = ("admin", "doctor", "nurse")


@dataclass(frozen=True)
class NotificationSettings:
    """Delivery settings (HIE_NOTIFY_*, HIE_NATS_URL)."""

    retry_base_seconds: float = 5.0
    max_backoff_seconds: float = 300.0
    dead_letter_after_seconds: float = 24 * 3600.0
    timeout_seconds: float = 10.0
    nats_url: str = ""
    # JSON {organisation id or "*": [base URL, ...]} (see dsub.EndpointPolicy).
    endpoint_allow_list: str = ""
    # Comma-separated CIDRs production may deliver into (a regional private network).
    private_networks: str = ""
    # Loopback endpoints (a receiver on this machine): tests only, never by default.
    allow_loopback: bool = False

    @classmethod
    def from_env(cls, env: os._Environ[str] | dict[str, str] | None = None) -> NotificationSettings:
        env = os.environ if env is None else env
        return cls(
            retry_base_seconds=float(env.get("HIE_NOTIFY_RETRY_BASE_SECONDS", "5")),
            max_backoff_seconds=float(env.get("HIE_NOTIFY_MAX_BACKOFF_SECONDS", "300")),
            dead_letter_after_seconds=float(env.get("HIE_NOTIFY_DEAD_LETTER_AFTER_SECONDS", str(24 * 3600))),
            timeout_seconds=float(env.get("HIE_NOTIFY_TIMEOUT_SECONDS", "10")),
            nats_url=env.get("HIE_NATS_URL", ""),
            endpoint_allow_list=_allow_list(env),
            private_networks=env.get("HIE_NOTIFY_PRIVATE_NETWORKS", ""),
            allow_loopback=env.get("HIE_NOTIFY_ALLOW_LOOPBACK", "").lower() in {"1", "true", "yes"},
        )


def _allow_list(env: os._Environ[str] | dict[str, str]) -> str:
    """HIE_NOTIFY_ENDPOINT_ALLOWLIST (JSON), or the JSON file HIE_NOTIFY_ENDPOINT_ALLOWLIST_FILE names."""
    path = env.get("HIE_NOTIFY_ENDPOINT_ALLOWLIST_FILE", "")
    if path:
        return Path(path).read_text(encoding="utf-8")
    return env.get("HIE_NOTIFY_ENDPOINT_ALLOWLIST", "")


class DeliveryRefused(Exception):
    """The receiver answered with something other than 2xx."""

    def __init__(self, status: int) -> None:
        super().__init__(str(status))
        self.status = status


class EndpointRefused(Exception):
    """The endpoint is (no longer) allowed: not under the organisation's allow-listed base URLs,
    or its host resolves to an address notifications may not go to."""


# Actor of the audit events of deliveries: the registry itself, acting for no user.
_RELAY = Caller(
    organization_id=PLATFORM,
    organization_type=PLATFORM,
    client_id="service:registry",
    purpose_of_use="operations",
)
_RESOLVE_TIMEOUT_SECONDS = 5.0


def _ts(value: datetime.datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


async def check_endpoint(
    policy: dsub.EndpointPolicy, organization_id: str, url: str, *, delivering: bool = False
) -> list[str]:
    """The addresses notifications to `url` may connect to; EndpointRefused if the endpoint is
    outside the organisation's allow-listed base URLs, or its host is or resolves to an address
    notifications may not go to. The host is resolved in every mode (a numeric host such as
    `2852039166` is an address); a name that does not resolve is refused in production and at
    delivery, and accepted at subscription in development (hospital hosts that do not exist yet)."""
    base = policy.base_for(organization_id, url)
    if base is None:
        raise EndpointRefused("endpoint-not-allowed")
    host = urlsplit(url).hostname or ""
    literal = dsub.literal_ip(url)
    if literal:
        addresses = [literal]
    else:
        try:
            infos = await asyncio.wait_for(
                asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM),
                _RESOLVE_TIMEOUT_SECONDS,
            )
        except (OSError, TimeoutError):
            if policy.production or delivering:
                raise EndpointRefused("endpoint-unresolvable") from None
            return []
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    port = dsub.endpoint_port(url)
    # Every address the name resolves to must be allowed: the connection may use any of them.
    if not addresses or not all(policy.address_allowed(address, base, port) for address in addresses):
        raise EndpointRefused("endpoint-address-not-allowed")
    return addresses


def pinned(url: str, address: str) -> tuple[str, dict[str, str], dict[str, str]]:
    """The request to `url` sent to `address` (the one checked), with the original Host header and,
    for https, the original name for SNI and certificate verification."""
    parts = urlsplit(url)
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    literal = f"[{ip}]" if ip.version == 6 else str(ip)
    netloc = f"{literal}:{parts.port}" if parts.port else literal
    host_header = parts.netloc.rsplit("@", 1)[-1]
    extensions = {"sni_hostname": parts.hostname or ""} if parts.scheme == "https" else {}
    return urlunsplit(parts._replace(netloc=netloc)), {"host": host_header}, extensions


def own_ports(settings: Settings) -> frozenset[int]:
    """The ports the exchange itself listens on (its services' targets and the gateway)."""
    ports = {GATEWAY_PORT, *SERVICE_PORTS.values()}
    for target in settings.targets.values():
        _, _, port = target.rpartition(":")
        if port.isdigit():
            ports.add(int(port))
    public = urlsplit(settings.public_url)
    try:
        if public.port:
            ports.add(public.port)
    except ValueError:
        pass
    return frozenset(ports)


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
        # Workflow events to NATS JetStream when HIE_NATS_URL is set (stream made sure of on connect).
        self._nats = JetStreamPublisher(
            settings.nats_url,
            subject=lambda event: f"hie.registry.{event['event_type']}",
            stream=NATS_STREAM,
            stream_subjects=["hie.registry.>"],
            connect_options={"connect_timeout": 2, "max_reconnect_attempts": 1},
        )
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
            runtime.background(self._close_nats_on_exit(), name="nats-close")

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
                names = {1: "replaces", 2: "appends", 3: "transforms"}
                document["relation"] = {"type": names[record.relation_type], "document_id": record.related_document_id}
            notifications = []
            for sub in subscriptions:
                # The type topic matched any of the set's types: this document's only.
                if sub.topic == dsub.TOPIC_DOCUMENT_TYPE and sub.type_code not in (
                    record.type_code,
                    record.shared_type,
                ):
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

    async def _close_nats_on_exit(self) -> None:
        import asyncio

        try:
            await asyncio.Event().wait()
        finally:
            await self._nats.close()


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
        expires=_ts(record.expires),
        created=_ts(record.created),
    )


def _dead_letter_message(record: store.DeadLetterRecord) -> notifications_pb2.DeadLetter:
    return notifications_pb2.DeadLetter(
        event_id=record.event_id,
        subscription_id=record.subscription_id,
        endpoint_url=record.endpoint_url,
        event_type=record.event_type,
        attempts=record.attempts,
        last_error=record.last_error,
        created=_ts(record.created),
        dead_lettered=_ts(record.dead_lettered),
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
        expires = dsub.check_expiry(
            request.expires.ToDatetime(tzinfo=datetime.UTC) if request.HasField("expires") else None, now
        )
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
            records = await session.scalars(
                select(store.SubscriptionRecord)
                .where(store.SubscriptionRecord.organization_id == who.organization_id)
                .order_by(store.SubscriptionRecord.created)
            )
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
        async with self._rt.sessions() as session, session.begin():
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
        self._rt.outbox.notify()
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
            records = await session.scalars(
                select(store.DeadLetterRecord)
                .where(store.DeadLetterRecord.organization_id == who.organization_id)
                .order_by(store.DeadLetterRecord.dead_lettered)
                .limit(500)
            )
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
            await session.execute(
                delete(store.DeadLetterRecord).where(store.DeadLetterRecord.event_id == record.event_id)
            )
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
