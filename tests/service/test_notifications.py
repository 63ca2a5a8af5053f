"""Subscriptions and notifications against a real local HTTP receiver: signed, traced,
redelivered after failures, never twice to a receiver that acknowledged, surviving a registry
restart between commit and delivery, dead-lettered and replayed; platform-only events; NATS."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hashlib
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import jwt
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from gateway.client import HospitalClient, Practitioner, user_assertion
from hie.audit.v1 import audit_pb2, audit_pb2_grpc
from hie.common.v1 import common_pb2
from hie.registry.v1 import notifications_pb2, notifications_pb2_grpc, registry_pb2, registry_pb2_grpc
from services.registry.service import SPEC as REGISTRY
from services.shared.auth import PlatformCredentials
from services.shared.process import RunningService, start_service
from services.shared.protection.sm2 import Sm2VerifyingKey
from tests.conftest import Exchange, drop_schemas
from tests.support.factories import person
from tests.support.webhooks import Receiver

NATS_URL = "nats://127.0.0.1:4222"


async def eventually(check: Callable[[], bool]) -> None:
    """Wait (at most 15 s) until the check holds."""
    deadline = asyncio.get_running_loop().time() + 15.0
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


_T = TypeVar("_T")


async def until(read: Callable[[], Awaitable[_T]], done: Callable[[_T], bool]) -> _T:
    """Read until `done` holds or 15 s have passed (a deadline, not a count of polls: on a loaded
    machine attempts and give-ups take longer); returns the last reading."""
    deadline = asyncio.get_running_loop().time() + 15.0
    while True:
        value = await read()
        if done(value) or asyncio.get_running_loop().time() > deadline:
            return value
        await asyncio.sleep(0.05)


class Broker:
    """A registry of its own (own database / schema) with fast retries, next to the exchange."""

    def __init__(self, exchange: Exchange, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        prefix = f"n{secrets.token_hex(3)}_" if exchange.settings.database_url else ""
        self.settings = dataclasses.replace(exchange.settings, data_dir=data_dir, schema_prefix=prefix)
        self.monkeypatch = monkeypatch
        self.running: RunningService | None = None
        self.channel: grpc.aio.Channel | None = None
        # Base URLs every organisation may register endpoints under (the local receivers).
        self.allowed: list[str] = []

    def allow(self, receiver: Receiver) -> None:
        """Allow-list a local receiver explicitly, as an admin would a hospital's endpoint."""
        self.allowed.append(receiver.url.rsplit("/", 1)[0] + "/")

    async def start(self, **env: str) -> None:
        for name, value in {
            "HIE_NOTIFY_ENDPOINT_ALLOWLIST": json.dumps({"*": self.allowed}),
            "HIE_NOTIFY_RETRY_BASE_SECONDS": "0.05",
            "HIE_NOTIFY_MAX_BACKOFF_SECONDS": "0.2",
            "HIE_NOTIFY_DEAD_LETTER_AFTER_SECONDS": "3600",
            "HIE_NOTIFY_TIMEOUT_SECONDS": "5",
            **env,
        }.items():
            self.monkeypatch.setenv(name, value)
        self.running = await start_service(REGISTRY, self.settings, listen="127.0.0.1:0")
        self.running.runtime.outbox.poll_interval = 0.05
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.running.port}")

    async def stop(self) -> None:
        if self.channel is not None:
            await self.channel.close()
        if self.running is not None:
            await self.running.stop(grace=None)
        self.running = self.channel = None

    @property
    def registry(self) -> registry_pb2_grpc.DocumentRegistryStub:
        return registry_pb2_grpc.DocumentRegistryStub(self.channel)

    @property
    def notifications(self) -> notifications_pb2_grpc.NotificationBrokerStub:
        return notifications_pb2_grpc.NotificationBrokerStub(self.channel)


@pytest.fixture
async def broker(
    exchange: Exchange, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, receiver: Receiver
) -> AsyncIterator[Broker]:
    running = Broker(exchange, tmp_path, monkeypatch)
    running.allow(receiver)
    try:
        yield running
    finally:
        await running.stop()
        if running.settings.database_url:
            await drop_schemas(running.settings)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    endpoint = Receiver()
    await endpoint.start()
    yield endpoint
    await endpoint.stop()


@dataclasses.dataclass
class Member:
    client: HospitalClient
    org_id: str
    token: str

    def md(self, *, role: str = "doctor", traceparent: str = "") -> tuple[tuple[str, str], ...]:
        practitioner = Practitioner(role=role)
        assertion = user_assertion(
            key=self.client.key, client_id=self.client.client_id, practitioner=practitioner, purpose="treatment"
        )
        sent = [("authorization", f"Bearer {self.token}"), ("x-hie-user-assertion", assertion)]
        if traceparent:
            sent.append(("traceparent", traceparent))
        return tuple(sent)


async def members(exchange: Exchange, count: int, local: str) -> list[Member]:
    patient = person("吴九")
    found = []
    for i in range(count):
        client = await exchange.member(name=f"订阅测试医院{i}")
        registered = await client.call("POST", "/api/v1/patients", json={"local_id": local, **patient})
        assert registered.status_code == 201, registered.text
        found.append(Member(client, client.org_id, await client.access_token()))  # type: ignore[attr-defined]
    return found


def _expiry(days: int = 1) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=days))
    return ts


async def subscribe(broker: Broker, member: Member, local: str, url: str) -> str:
    response = await broker.notifications.Subscribe(
        notifications_pb2.SubscribeRequest(
            topic=notifications_pb2.TOPIC_PATIENT_DOCUMENT,
            patient=common_pb2.PatientRef(local_id=local),
            endpoint_url=url,
            expires=_expiry(),
        ),
        metadata=member.md(),
    )
    return response.subscription.subscription_id


async def register(broker: Broker, member: Member, local: str, *, traceparent: str = "") -> str:
    content = "出院小结：病情稳定".encode()
    response = await broker.registry.RegisterDocument(
        registry_pb2.RegisterDocumentRequest(
            entry=registry_pb2.DocumentEntry(
                source_document_id=f"N-{secrets.token_hex(5)}",
                patient=common_pb2.PatientRef(local_id=local),
                type_code=registry_pb2.Coding(system="urn:hie:shared-document-type", code="discharge-summary"),
                title="出院小结",
                mime_type="text/plain; charset=utf-8",
                sha256=hashlib.sha256(content).hexdigest(),
            ),
            content=content,
        ),
        metadata=member.md(traceparent=traceparent),
    )
    return response.entry.document_id


def platform_jwk(keys_dir: Path) -> jwt.PyJWK:
    trusted = json.loads((keys_dir / "trusted.jwks.json").read_text())
    (key,) = [k for k in trusted["keys"] if k.get("hie_issuer") == "platform"]
    return jwt.PyJWK({k: v for k, v in key.items() if not k.startswith("hie_")})


async def test_notification_is_signed_traced_and_names_the_subscribers_patient(
    exchange: Exchange, broker: Broker, receiver: Receiver, keys_dir: Path
) -> None:
    await broker.start()
    local = f"NT-{secrets.token_hex(3)}"
    source, subscriber = await members(exchange, 2, local)
    subscription_id = await subscribe(broker, subscriber, local, receiver.url)
    trace_id = secrets.token_hex(16)
    document_id = await register(broker, source, local, traceparent=f"00-{trace_id}-{secrets.token_hex(8)}-01")
    await eventually(lambda: len(receiver.received) == 1)
    headers, body, _status = receiver.received[0]
    event = json.loads(body)
    assert event["event_type"] == "document.registered"
    assert event["subscription_id"] == subscription_id
    assert event["document"]["document_id"] == document_id
    assert event["document"]["shared_type"] == "discharge-summary"
    assert event["patient"] == {"domain": subscriber.org_id, "local_ids": [local]}
    assert headers["x-hie-event-id"] == event["event_id"]
    assert headers["traceparent"].split("-")[1] == trace_id
    # The signature is a detached JWS over the exact body, by the exchange's platform key.
    jwk = platform_jwk(keys_dir)
    verified = jwt.api_jws.decode_complete(
        headers["x-hie-signature"], key=jwk.key, algorithms=["ES384"], detached_payload=body
    )
    assert verified["header"]["kid"] == jwk.key_id
    assert verified["header"]["typ"] == "hie-notification+jws"
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.api_jws.decode_complete(
            headers["x-hie-signature"], key=jwk.key, algorithms=["ES384"], detached_payload=body + b" "
        )
    # The source hospital is not told about its own document; an unsubscribed hospital hears nothing more.
    await broker.notifications.Unsubscribe(
        notifications_pb2.UnsubscribeRequest(subscription_id=subscription_id), metadata=subscriber.md()
    )
    await register(broker, source, local)
    await asyncio.sleep(0.3)
    assert len(receiver.received) == 1


async def test_redelivered_after_failures_and_never_twice_once_acknowledged(
    exchange: Exchange, broker: Broker, receiver: Receiver
) -> None:
    other = Receiver()
    await other.start()
    broker.allow(other)
    await broker.start()
    try:
        local = f"NR-{secrets.token_hex(3)}"
        source, flaky, steady = await members(exchange, 3, local)
        await subscribe(broker, flaky, local, receiver.url)
        await subscribe(broker, steady, local, other.url)
        receiver.statuses = [500, 500]
        await register(broker, source, local)
        await eventually(lambda: len(receiver.acknowledged()) == 1 and len(other.acknowledged()) == 1)
        assert [status for _h, _b, status in receiver.received] == [500, 500, 200]
        assert len({h["x-hie-event-id"] for h, _b, _s in receiver.received}) == 1
        # Nothing more arrives at either once acknowledged, however often the relay runs.
        for _ in range(5):
            await broker.running.runtime.outbox.relay_once()  # type: ignore[union-attr]
        await asyncio.sleep(0.3)
        assert len(receiver.received) == 3
        assert len(other.received) == 1
    finally:
        await other.stop()


async def test_notification_survives_a_registry_restart_between_commit_and_delivery(
    exchange: Exchange, broker: Broker, receiver: Receiver
) -> None:
    await broker.start()
    local = f"NS-{secrets.token_hex(3)}"
    source, subscriber = await members(exchange, 2, local)
    await subscribe(broker, subscriber, local, receiver.url)
    # The relay is down: the registration commits, the notification waits in the outbox.
    await broker.running.runtime.outbox.stop()  # type: ignore[union-attr]
    document_id = await register(broker, source, local)
    await asyncio.sleep(0.2)
    assert receiver.received == []
    await broker.stop()
    await broker.start()
    await eventually(lambda: len(receiver.received) == 1)
    assert json.loads(receiver.received[0][1])["document"]["document_id"] == document_id
    await asyncio.sleep(0.3)
    assert len(receiver.received) == 1


async def test_undeliverable_notification_is_dead_lettered_and_replayed(
    exchange: Exchange, broker: Broker, receiver: Receiver, keys_dir: Path
) -> None:
    await broker.start(HIE_NOTIFY_DEAD_LETTER_AFTER_SECONDS="0.5")
    local = f"ND-{secrets.token_hex(3)}"
    source, subscriber = await members(exchange, 2, local)
    await subscribe(broker, subscriber, local, receiver.url)
    receiver.statuses = [503] * 1000
    await register(broker, source, local)

    async def dead_letters() -> list[notifications_pb2.DeadLetter]:
        listed = await broker.notifications.ListDeadLetters(
            notifications_pb2.ListDeadLettersRequest(), metadata=subscriber.md(role="admin")
        )
        return list(listed.dead_letters)

    (dead,) = await until(dead_letters, bool)
    assert dead.attempts >= 2
    assert dead.last_error == "DeliveryRefused"
    tries = len(receiver.received)
    await asyncio.sleep(0.3)
    assert len(receiver.received) == tries  # given up: no more attempts
    with pytest.raises(grpc.aio.AioRpcError) as not_admin:
        await dead_letters_as(broker, subscriber, role="doctor")
    assert not_admin.value.code() == grpc.StatusCode.PERMISSION_DENIED

    receiver.statuses = []
    await broker.notifications.ReplayDeadLetter(
        notifications_pb2.ReplayDeadLetterRequest(event_id=dead.event_id), metadata=subscriber.md(role="admin")
    )
    await eventually(lambda: len(receiver.acknowledged()) == 1)
    assert receiver.acknowledged()[0][0]["x-hie-event-id"] == dead.event_id
    assert await dead_letters() == []

    # Every attempt, the dead-lettering and the replay are in the audit trail, by ids only.
    def trail(events: list[audit_pb2.AuditEvent]) -> list[tuple[str, int, str]]:
        return [
            (e.type, e.outcome, next((x.id for x in e.entities if x.type == "DeliveryAttempt"), ""))
            for e in events
            if any(x.type == "Notification" and x.id == dead.event_id for x in e.entities)
        ]

    async def audited() -> list[tuple[str, int, str]]:
        return trail(await audit_events(exchange, keys_dir, "notification."))

    found = await until(
        audited, lambda f: any(o == audit_pb2.OUTCOME_SUCCESS for t, o, _a in f if t == "notification.deliver")
    )
    delivers = [(outcome, attempt) for t, outcome, attempt in found if t == "notification.deliver"]
    failed = [attempt for outcome, attempt in delivers if outcome == audit_pb2.OUTCOME_MINOR_FAILURE]
    assert len(failed) == tries
    assert all(a.endswith(":http-503") for a in failed)
    assert [a for o, a in delivers if o == audit_pb2.OUTCOME_SUCCESS] == ["1:delivered"]  # the replay's first
    assert [(t, o) for t, o, _a in found if t == "notification.dead-letter"] == [
        ("notification.dead-letter", audit_pb2.OUTCOME_SERIOUS_FAILURE)
    ]
    assert any(t == "notification.replay" for t, _o, _a in found)
    for event in await audit_events(exchange, keys_dir, "notification.deliver"):
        # The subscriber, subscription and attempt: never the endpoint or the body.
        assert {x.type for x in event.entities} <= {"Notification", "Subscription", "Organization", "DeliveryAttempt"}
        assert event.actor.organization_type == "platform"


async def audit_events(exchange: Exchange, keys_dir: Path, prefix: str) -> list[audit_pb2.AuditEvent]:
    """The exchange's audit events whose type starts with the prefix (as an auditor would query)."""
    credentials = PlatformCredentials.from_file(keys_dir / "platform.pem", service="test", issuer="urn:test")
    found: list[audit_pb2.AuditEvent] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{exchange.services['audit'].port}") as channel:
        stub = audit_pb2_grpc.AuditLogStub(channel)
        token = ""
        while True:
            page = await stub.Query(
                audit_pb2.QueryRequest(page=common_pb2.PageRequest(page_size=200, page_token=token)),
                metadata=credentials.metadata(),
            )
            found.extend(e for e in page.events if e.type.startswith(prefix))
            token = page.page.next_page_token
            if not token:
                return found


async def dead_letters_as(broker: Broker, member: Member, *, role: str) -> Any:
    return await broker.notifications.ListDeadLetters(
        notifications_pb2.ListDeadLettersRequest(), metadata=member.md(role=role)
    )


async def test_workflow_events_are_published_by_exchange_services_only(
    exchange: Exchange, broker: Broker, receiver: Receiver, keys_dir: Path
) -> None:
    await broker.start()
    local = f"NW-{secrets.token_hex(3)}"
    (hospital,) = await members(exchange, 1, local)
    await broker.notifications.Subscribe(
        notifications_pb2.SubscribeRequest(
            topic=notifications_pb2.TOPIC_WORKFLOW_STATE, endpoint_url=receiver.url, expires=_expiry()
        ),
        metadata=hospital.md(),
    )
    event = notifications_pb2.PublishEventRequest(
        event_type="referral.accepted",
        organization_ids=[hospital.org_id],
        resource_type="ServiceRequest",
        resource_id="R-1",
        status="accepted",
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await broker.notifications.PublishEvent(event, metadata=hospital.md())
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    referral = PlatformCredentials.from_file(
        keys_dir / "platform.pem", service="referral", issuer="urn:hie:service:referral"
    )
    published = await broker.notifications.PublishEvent(event, metadata=referral.metadata())
    assert published.notifications == 1
    await eventually(lambda: len(receiver.received) == 1)
    body = json.loads(receiver.received[0][1])
    assert body["event_type"] == "referral.accepted"
    assert body["resource"] == {"type": "ServiceRequest", "id": "R-1", "status": "accepted"}


async def test_endpoints_outside_the_allow_list_are_refused(
    exchange: Exchange, broker: Broker, receiver: Receiver
) -> None:
    await broker.start()
    local = f"NA-{secrets.token_hex(3)}"
    (hospital,) = await members(exchange, 1, local)
    port = receiver.url.split(":")[2].split("/")[0]
    for url in (
        "http://127.0.0.1:9/hie/notifications",  # loopback, another port: the audit or a database
        f"http://127.0.0.1:{port}/admin",  # the receiver's host, outside the listed path
        f"http://127.0.0.1:{port}/hie/../admin",
        "http://169.254.169.254/latest/meta-data",  # cloud metadata
        "https://his.other.example/hie/notifications",
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await subscribe(broker, hospital, local, url)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, url
        assert dict(refused.value.trailing_metadata() or ()).get("hie-error-reason") == "endpoint-not-allowed"
    listed = await broker.notifications.ListSubscriptions(
        notifications_pb2.ListSubscriptionsRequest(), metadata=hospital.md()
    )
    assert list(listed.subscriptions) == []
    assert await subscribe(broker, hospital, local, receiver.url)


async def test_subscription_input_is_checked(exchange: Exchange, broker: Broker) -> None:
    await broker.start()
    local = f"NI-{secrets.token_hex(3)}"
    (hospital,) = await members(exchange, 1, local)
    cases = [
        (dict(topic=notifications_pb2.TOPIC_PATIENT_DOCUMENT, endpoint_url="ftp://x/y"), "endpoint-invalid"),
        (
            dict(topic=notifications_pb2.TOPIC_PATIENT_DOCUMENT, endpoint_url="https://h.example/n"),
            "expiry-missing",
        ),
        (
            dict(
                topic=notifications_pb2.TOPIC_PATIENT_DOCUMENT,
                endpoint_url="https://h.example/n",
                expires=_expiry(400),
            ),
            "expiry-invalid",
        ),
        (
            dict(
                topic=notifications_pb2.TOPIC_PATIENT_DOCUMENT,
                endpoint_url="https://h.example/n",
                expires=_expiry(),
                patient=common_pb2.PatientRef(local_id="NOBODY"),
            ),
            "patient-not-registered",
        ),
    ]
    for fields, reason in cases:
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await broker.notifications.Subscribe(notifications_pb2.SubscribeRequest(**fields), metadata=hospital.md())
        assert dict(bad.value.trailing_metadata() or ()).get("hie-error-reason") == reason


async def test_events_are_published_to_nats_jetstream_when_configured(
    exchange: Exchange, broker: Broker, receiver: Receiver
) -> None:
    nats = pytest.importorskip("nats")
    try:
        connection = await nats.connect(NATS_URL, connect_timeout=1, max_reconnect_attempts=0)
    except Exception:
        pytest.skip("no NATS server at 127.0.0.1:4222")
    try:
        await broker.start(HIE_NATS_URL=NATS_URL)
        local = f"NJ-{secrets.token_hex(3)}"
        source, subscriber = await members(exchange, 2, local)
        await subscribe(broker, subscriber, local, receiver.url)
        document_id = await register(broker, source, local)
        await eventually(lambda: len(receiver.received) == 1)
        js = connection.jetstream()
        seen: list[dict[str, Any]] = []
        for _ in range(100):
            try:
                message = await js.get_last_msg("HIE_EVENTS", "hie.registry.document.registered")
            except Exception:
                message = None
            if message is not None:
                event = json.loads(message.data)
                if event["document"]["document_id"] == document_id:
                    seen.append(event)
                    assert message.headers["Nats-Msg-Id"] == event["event_id"]
                    break
            await asyncio.sleep(0.05)
        assert seen, "the event was not published to JetStream"
    finally:
        await connection.close()


async def test_under_the_national_algorithms_notifications_are_also_sm2_co_signed(
    exchange: Exchange, broker: Broker, receiver: Receiver, tmp_path: Path
) -> None:
    broker.settings = dataclasses.replace(
        broker.settings, crypto_suite="sm", sm2_signing_key_file=tmp_path / "platform-sm2.json"
    )
    await broker.start()
    local = f"SM-{secrets.token_hex(3)}"
    source, subscriber = await members(exchange, 2, local)
    await subscribe(broker, subscriber, local, receiver.url)
    await register(broker, source, local)
    await eventually(lambda: len(receiver.received) == 1)
    headers, body, _status = receiver.received[0]
    keys = await broker.notifications.GetSigningKeys(
        notifications_pb2.GetSigningKeysRequest(), metadata=subscriber.md()
    )
    assert keys.sm2_signer_id == "1234567812345678"
    public = Sm2VerifyingKey(bytes.fromhex(keys.sm2_public_key))
    signature = bytes.fromhex(headers["x-hie-signature-sm2"])
    assert public.verify(body, signature)
    assert not public.verify(body + b" ", signature)
    # The JWS stays: receivers that only know JOSE keep verifying as before.
    assert headers["x-hie-signature"].count(".") == 2


async def test_without_the_option_there_is_no_sm2_signature_and_no_sm2_key(
    exchange: Exchange, broker: Broker, receiver: Receiver
) -> None:
    await broker.start()
    local = f"NS-{secrets.token_hex(3)}"
    source, subscriber = await members(exchange, 2, local)
    await subscribe(broker, subscriber, local, receiver.url)
    await register(broker, source, local)
    await eventually(lambda: len(receiver.received) == 1)
    assert "x-hie-signature-sm2" not in receiver.received[0][0]
    keys = await broker.notifications.GetSigningKeys(
        notifications_pb2.GetSigningKeysRequest(), metadata=subscriber.md()
    )
    assert keys.sm2_public_key == ""
    # Through the gateway (the exchange's own registry runs the default suite): 404, not an empty key.
    response = await subscriber.client.call("GET", "/api/v1/notifications/sm2-key")
    assert response.status_code == 404, response.text
    assert response.json()["error"]["reason"] == "sm2-not-configured"
