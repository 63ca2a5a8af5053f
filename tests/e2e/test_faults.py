"""Fault tests: real processes killed, a disk filled, a webhook receiver that hangs.

The registry runs as its own process (`python -m services.registry`) so it can be killed with
SIGKILL mid-write and restarted on the same port; the other services and the gateway run in the
test process. Every figure a test measures is printed (`pytest -s` shows it).

Bounds (generous: the machine is shared):
- a restarted registry answers through the gateway, and /readyz says ready, within
  RECOVERY_BOUND seconds of serving again after an outage of some seconds;
- an audit event reaches the audit log within AUDIT_LAG_BOUND seconds of the write while a
  hospital's receiver hangs (its deliveries time out after 10 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import event, text

from hie.audit.v1 import audit_pb2, audit_pb2_grpc
from hie.common.v1 import common_pb2
from services.audit.service import SPEC as AUDIT
from services.consent.service import SPEC as CONSENT
from services.mpi.service import SPEC as MPI
from services.referral.service import SPEC as REFERRAL
from services.shared.auth import PlatformCredentials
from services.shared.process import RunningService, start_service
from services.teleconsult.service import SPEC as TELECONSULT
from tests.conftest import Exchange, RunningGateway, _backends, base_settings, drop_schemas, serve_gateway
from tests.support.factories import document, person

pytestmark = pytest.mark.fault

RECOVERY_BOUND = 1.5
# How long the registry stays down before its restart (which takes another 2-3 s): long enough
# for gRPC's default reconnect backoff (1 s x 1.6 per attempt) to reach ~6 s.
LONG_OUTAGE_SECONDS = 11.0
AUDIT_LAG_BOUND = 3.0
# Text of the transport that must never reach a client.
_INTERNAL_TEXT = ("127.0.0.1", "ipv4", "ipv6", "connection refused", "stream removed", "recvmsg", "failed to connect")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class HungReceiver:
    """A hospital's webhook endpoint that accepts the connection and never answers."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.port = 0
        self.connections = 0

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(Exception):
            while await reader.read(65536):
                pass
        writer.close()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._hold, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 1)


class RegistryProcess:
    """The registry as its own OS process on a fixed loopback port, killable and restartable."""

    def __init__(self, env: dict[str, str], port: int, log: Path) -> None:
        self.env = env
        self.port = port
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.registry"], env=self.env, stdout=out, stderr=subprocess.STDOUT
            )

    def kill(self) -> None:
        """SIGKILL: no shutdown, no flush, in-flight calls cut."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    async def serving(self, limit: float = 60.0) -> float:
        """Wait until the health check answers SERVING; returns the seconds waited."""
        started = time.monotonic()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                assert self.process is not None
                assert self.process.poll() is None, self.log.read_text()[-3000:]
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return time.monotonic() - started
                assert time.monotonic() - started < limit, "the registry did not start"
                await asyncio.sleep(0.05)


@dataclasses.dataclass
class FaultExchange:
    exchange: Exchange
    registry: RegistryProcess
    receiver: HungReceiver
    audit_port: int
    credentials: PlatformCredentials

    async def audit(self, **query: Any) -> list[audit_pb2.AuditEvent]:
        """Every audit event matching the query, read from the audit service (all pages)."""
        events: list[audit_pb2.AuditEvent] = []
        token = ""
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.audit_port}") as channel:
            stub = audit_pb2_grpc.AuditLogStub(channel)
            while True:
                found = await stub.Query(
                    audit_pb2.QueryRequest(page=common_pb2.PageRequest(page_size=500, page_token=token), **query),
                    metadata=self.credentials.metadata(),
                )
                events.extend(found.events)
                token = found.page.next_page_token
                if not token:
                    return events

    async def chain_intact(self) -> bool:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.audit_port}") as channel:
            verified = await audit_pb2_grpc.AuditLogStub(channel).VerifyChain(
                audit_pb2.VerifyChainRequest(), metadata=self.credentials.metadata()
            )
        return verified.intact


@pytest.fixture(scope="module", params=_backends())
async def faulty(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, keys_dir: Path
) -> AsyncIterator[FaultExchange]:
    backend = request.param
    data_dir = tmp_path_factory.mktemp(f"faults-{backend}")
    settings = base_settings(data_dir, keys_dir, backend)
    registry_port = _free_port()
    settings = dataclasses.replace(
        settings, targets={**settings.targets, "registry": f"127.0.0.1:{registry_port}"}, outbox_lease_seconds=2.0
    )
    receiver = HungReceiver()
    await receiver.start()
    services: dict[str, RunningService] = {}
    registry: RegistryProcess | None = None
    gateway: RunningGateway | None = None
    try:
        for spec in (AUDIT, MPI, CONSENT, REFERRAL, TELECONSULT):
            running = await start_service(spec, settings, listen="127.0.0.1:0")
            services[spec.name] = running
            settings = dataclasses.replace(
                settings, targets={**settings.targets, spec.name: f"127.0.0.1:{running.port}"}
            )
        for running in services.values():
            running.runtime.settings = settings
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HIE_", "OTEL_"))}
        env.update(
            {
                "HIE_DATA_DIR": str(settings.data_dir),
                "HIE_TRUSTED_JWKS_FILE": str(settings.trusted_jwks_file),
                "HIE_GATEWAY_SIGNING_KEY_FILE": str(settings.gateway_signing_key_file),
                "HIE_SERVICE_SIGNING_KEY_FILE": str(settings.service_signing_key_file),
                "HIE_DATA_KEYS_FILE": str(settings.data_keys_file),
                "HIE_SM2_SIGNING_KEY_FILE": str(settings.sm2_signing_key_file),
                "HIE_LISTEN": f"127.0.0.1:{registry_port}",
                "HIE_LOG_LEVEL": "WARNING",
                "HIE_OUTBOX_LEASE_SECONDS": "2",
                "HIE_NOTIFY_ENDPOINT_ALLOWLIST": json.dumps({"*": [receiver.base_url]}),
                # The default: a hung receiver holds each delivery this long.
                "HIE_NOTIFY_TIMEOUT_SECONDS": "10",
                **{f"HIE_{name.upper()}_TARGET": target for name, target in settings.targets.items()},
            }
        )
        if settings.database_url:
            env["HIE_DATABASE_URL"] = settings.database_url
            env["HIE_DB_SCHEMA_PREFIX"] = settings.schema_prefix
        registry = RegistryProcess(env, registry_port, data_dir / "registry.log")
        registry.start()
        await registry.serving()
        gateway = await serve_gateway(settings)
        exchange = Exchange(backend, gateway.settings, gateway.base_url, services)
        exchange.other_outboxes.append(gateway.server.config.app.state.outbox)
        credentials = PlatformCredentials.from_file(
            settings.service_signing_key_file, service="fault-test", issuer="urn:test"
        )
        yield FaultExchange(exchange, registry, receiver, services["audit"].port, credentials)
    finally:
        if gateway is not None:
            await gateway.stop()
        if registry is not None:
            registry.stop()
        for running in services.values():
            await running.stop(grace=None)
        await receiver.stop()
        await drop_schemas(settings)


async def _within(seconds: float, check: Callable[[], Awaitable[bool]], what: str) -> float:
    """Poll until the check holds; returns the seconds it took."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < seconds, f"{what}: not within {seconds} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def _true_when(condition: bool) -> bool:
    return condition


def _assert_nothing_internal(response: httpx.Response) -> None:
    text = response.text.lower()
    assert not any(fragment in text for fragment in _INTERNAL_TEXT), response.text
    if response.status_code == 503:
        assert response.headers.get("retry-after", "").isdigit(), response.headers
        body = response.json()
        if "error" in body:
            assert body["error"]["reason"], body
            assert body["error"]["trace_id"], body
        else:
            assert body["resourceType"] == "OperationOutcome", body
            assert body["extension"][0]["valueString"], body


async def test_kill_registry_under_concurrent_writes_loses_nothing_and_duplicates_nothing(
    faulty: FaultExchange,
) -> None:
    exchange, registry = faulty.exchange, faulty.registry
    client = await exchange.member(name="故障测试医院")
    local = f"F-{secrets.token_hex(3)}"
    registered = await client.call("POST", "/api/v1/patients", json={"local_id": local, **person("郑十")})
    assert registered.status_code == 201, registered.text
    workers, per_worker = 4, 10
    docs = {
        f"fault-{secrets.token_hex(6)}": document(local, f"出院小结 {n}".encode(), source_document_id=f"FD-{n}")
        for n in range(workers * per_worker)
    }
    keys = list(docs)
    first: dict[str, httpx.Response] = {}
    failed: list[httpx.Response] = []

    async def post(key: str) -> httpx.Response | None:
        try:
            return await client.call("POST", "/api/v1/documents", json=docs[key], headers={"Idempotency-Key": key})
        except httpx.TransportError:
            return None

    async def worker(mine: list[str]) -> None:
        for key in mine:
            answer = await post(key)
            if answer is not None and answer.status_code in (200, 201):
                first[key] = answer
            elif answer is not None:
                failed.append(answer)
            await asyncio.sleep(0.05)

    async def killer() -> tuple[float, float]:
        # Kill once some registrations went through, while the others are in flight.
        await _within(60, lambda: _true_when(len(first) >= 8), "first registrations")
        registry.kill()
        killed = time.monotonic()
        await asyncio.sleep(1.0)
        registry.start()
        serving_after = await registry.serving()
        return killed, serving_after

    tasks = [asyncio.create_task(worker(keys[i::workers])) for i in range(workers)]
    killed, serving_after = await killer()
    await asyncio.gather(*tasks)
    # During the outage clients got a stable reason, never an internal address.
    assert failed, "no request fell into the outage"
    for answer in failed:
        assert answer.status_code in (503, 504), answer.text
        _assert_nothing_internal(answer)
    # Retry what failed, with the same keys, until every document is answered.
    retry_started = time.monotonic()
    while missing := [k for k in keys if k not in first]:
        assert time.monotonic() - retry_started < 30, f"{len(missing)} documents never registered"
        for key in missing:
            answer = await post(key)
            if answer is not None and answer.status_code in (200, 201):
                first[key] = answer
        await asyncio.sleep(0.2)
    # Every registration answered 201 once created (a retry of a commit whose answer was lost
    # gets that first 201 and its audit event again), with one audit event each.
    assert {k: first[k].status_code for k in keys} == dict.fromkeys(keys, 201)
    assert all(len(first[k].json()["audit_event_ids"]) == 1 for k in keys)
    # The same request again answers the first response, status and body.
    for key in keys:
        again = await post(key)
        assert again is not None
        assert (again.status_code, again.json()) == (201, first[key].json())
    # Nothing lost, nothing twice.
    ids = {k: first[k].json()["document_id"] for k in keys}
    assert len(set(ids.values())) == len(keys)
    listed = await client.call("GET", "/api/v1/documents", params={"patient_local_id": local, "page_size": 200})
    assert listed.status_code == 200, listed.text
    entries = listed.json()["entries"]
    assert sorted(e["document_id"] for e in entries) == sorted(ids.values())
    # Audit exactly once per document, the events the clients were given, chain intact.
    given = {first[k].json()["audit_event_ids"][0] for k in keys}

    async def audited() -> bool:
        events = await faulty.audit(organization_id=client.org_id, type="document.register")  # type: ignore[attr-defined]
        return {e.event_id for e in events} >= given

    audit_wait = await _within(20, audited, "audit events delivered")
    events = await faulty.audit(organization_id=client.org_id, type="document.register")  # type: ignore[attr-defined]
    audited_docs = [ref.id for e in events for ref in e.entities if ref.type == "DocumentReference"]
    assert sorted(audited_docs) == sorted(ids.values())
    assert {e.event_id for e in events} == given
    assert await faulty.chain_intact()
    print(
        f"\n[{exchange.backend}] kill -9 registry: {len(failed)} requests failed during the outage; "
        f"registry serving {serving_after:.2f} s after restart (down {1.0 + serving_after:.2f} s in all); "
        f"all {len(keys)} registered {time.monotonic() - killed:.2f} s after the kill; "
        f"audit settled in {audit_wait:.2f} s more"
    )


async def test_a_registration_committed_before_a_crash_answers_its_first_201_and_queries_recover(
    faulty: FaultExchange,
) -> None:
    exchange, registry = faulty.exchange, faulty.registry
    client = await exchange.member(name="重试测试医院")
    local = f"R-{secrets.token_hex(3)}"
    registered = await client.call("POST", "/api/v1/patients", json={"local_id": local, **person("冯十一")})
    assert registered.status_code == 201, registered.text
    key = secrets.token_hex(8)
    submission = document(local, "检验报告".encode())
    created = await client.call("POST", "/api/v1/documents", json=submission, headers={"Idempotency-Key": key})
    assert created.status_code == 201, created.text
    # The registry dies right after the commit: the answer must come from its database.
    registry.kill()
    try:
        down = await client.call("GET", "/api/v1/documents", params={"patient_local_id": local})
        assert (down.status_code, down.json()["error"]["reason"]) == (503, "service-unavailable")
        _assert_nothing_internal(down)
        fhir_down = await client.call(
            "GET",
            "/fhir/R4/DocumentReference",
            params={"patient.identifier": f"urn:hie:patient-id:{client.org_id}|{local}"},  # type: ignore[attr-defined]
        )
        assert fhir_down.status_code == 503
        _assert_nothing_internal(fhir_down)
        # Clients keep asking: each failed connection attempt lengthens the channel's reconnect
        # backoff (unbounded, it reached 5-8 s after a 20 s outage). The long outage runs on one
        # backend only: the channel does not depend on the database. Readiness says "down" every
        # time it is asked (a channel's cached state said ready while it waited out its backoff).
        outage_ends = time.monotonic() + (LONG_OUTAGE_SECONDS if exchange.backend == "sqlite" else 2.0)
        while time.monotonic() < outage_ends:
            ready = await client.http.get(f"{exchange.base_url}/readyz")
            # (On this shared machine an in-process service may miss the health deadline too.)
            assert ready.status_code == 503
            assert "registry" in ready.json()["down"]
            assert ready.headers["retry-after"].isdigit()
            polled = await client.call("GET", "/api/v1/documents", params={"patient_local_id": local})
            assert polled.status_code == 503, polled.text
            _assert_nothing_internal(polled)
            await asyncio.sleep(0.2)
    finally:
        # Back in any case: the module's other tests use it.
        registry.start()
        await registry.serving()
    restarted = time.monotonic()

    async def answers() -> bool:
        again = await client.call("GET", "/api/v1/documents", params={"patient_local_id": local})
        return again.status_code == 200

    async def reported_ready() -> bool:
        return (await client.http.get(f"{exchange.base_url}/readyz")).status_code == 200

    query_recovery = await _within(RECOVERY_BOUND, answers, "queries after the registry is back")
    ready_recovery = await _within(RECOVERY_BOUND, reported_ready, "readiness after the registry is back")
    retried = await client.call("POST", "/api/v1/documents", json=submission, headers={"Idempotency-Key": key})
    assert (retried.status_code, retried.json()) == (201, created.json())
    # The same key with another request is a conflict with its reason.
    other = {**submission, "title": "另一份报告"}
    reused = await client.call("POST", "/api/v1/documents", json=other, headers={"Idempotency-Key": key})
    assert (reused.status_code, reused.json()["error"]["reason"]) == (409, "idempotency-key-reused")
    print(
        f"\n[{exchange.backend}] registry back (serving): first query answered after {query_recovery:.2f} s, "
        f"/readyz ready after {query_recovery + ready_recovery:.2f} s (since serving: "
        f"{time.monotonic() - restarted:.2f} s)"
    )


async def test_a_hung_receiver_does_not_delay_the_audit_trail_and_a_retried_subscription_is_one(
    faulty: FaultExchange,
) -> None:
    exchange = faulty.exchange
    author = await exchange.member(name="写入医院")
    subscriber = await exchange.member(name="订阅医院")
    patient = person("褚十二")
    local_a, local_b = f"A-{secrets.token_hex(3)}", f"B-{secrets.token_hex(3)}"
    for client, local in ((author, local_a), (subscriber, local_b)):
        answer = await client.call("POST", "/api/v1/patients", json={"local_id": local, **patient})
        assert answer.status_code == 201, answer.text
    subscription = {
        "topic": "patient-document",
        "patient_local_id": local_b,
        "endpoint_url": f"{faulty.receiver.base_url}hie/notifications",
        "expires": (datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=30)).isoformat(),
    }
    key = secrets.token_hex(8)
    subscribed = [
        await subscriber.call("POST", "/api/v1/subscriptions", json=subscription, headers={"Idempotency-Key": key})
        for _ in range(2)
    ]
    assert [s.status_code for s in subscribed] == [201, 201], subscribed[0].text
    assert subscribed[1].json() == subscribed[0].json()
    listed = await subscriber.call("GET", "/api/v1/subscriptions")
    assert [s["subscription_id"] for s in listed.json()["subscriptions"]] == [subscribed[0].json()["subscription_id"]]
    reused = await subscriber.call(
        "POST",
        "/api/v1/subscriptions",
        json={**subscription, "topic": "workflow-state"},
        headers={"Idempotency-Key": key},
    )
    assert (reused.status_code, reused.json()["error"]["reason"]) == (409, "idempotency-key-reused")
    # Each registration notifies the subscriber, whose receiver never answers (10 s timeout).
    lags: list[float] = []
    for n in range(3):
        created = await author.call("POST", "/api/v1/documents", json=document(local_a, f"影像报告 {n}".encode()))
        assert created.status_code == 201, created.text
        committed = time.monotonic()
        event_id = created.json()["audit_event_ids"][0]

        async def audited(event_id: str = event_id) -> bool:
            events = await faulty.audit(organization_id=author.org_id, type="document.register")  # type: ignore[attr-defined]
            return event_id in {e.event_id for e in events}

        await _within(AUDIT_LAG_BOUND, audited, "audit event while a receiver hangs")
        lags.append(time.monotonic() - committed)
        await asyncio.sleep(0.3)
    assert faulty.receiver.connections >= 1, "the webhook was never attempted"
    print(
        f"\n[{exchange.backend}] audit lag behind a hung receiver: "
        + ", ".join(f"{lag:.2f} s" for lag in lags)
        + f" (bound {AUDIT_LAG_BOUND} s)"
    )


@contextlib.asynccontextmanager
async def _mpi_storage_full(exchange: Exchange) -> AsyncIterator[None]:
    """The mpi's database refuses to grow, each backend by a real mechanism the test controls.

    SQLite: `max_page_count` capped at the file's current size on every connection, so inserts
    fail with SQLITE_FULL ("database or disk is full"), the error a full disk gives. PostgreSQL:
    a trigger on the mpi's outbox (every write and every audited read stages a row there) raises
    SQLSTATE 53100 disk_full, the server's own error for a full disk (filling the disk of a
    shared server is not something a test may do)."""
    engine = exchange.services["mpi"].runtime.engine
    if exchange.backend == "sqlite":
        cap = {"on": True}

        def capped(dbapi_connection: Any, _record: Any) -> None:
            if cap["on"]:
                cursor = dbapi_connection.cursor()
                cursor.execute("PRAGMA max_page_count = 1")  # raised to the current size
                cursor.close()

        event.listen(engine.sync_engine, "connect", capped)
        await engine.dispose()
        try:
            yield
        finally:
            cap["on"] = False
            event.remove(engine.sync_engine, "connect", capped)
            await engine.dispose()
        return
    schema = exchange.settings.schema_for("mpi")
    async with engine.begin() as conn:
        await conn.execute(
            text(
                f'CREATE FUNCTION "{schema}".hie_test_disk_full() RETURNS trigger LANGUAGE plpgsql AS '
                "$$ BEGIN RAISE EXCEPTION 'could not extend file' USING ERRCODE = 'disk_full'; END $$"
            )
        )
        await conn.execute(
            text(
                f'CREATE TRIGGER hie_test_disk_full BEFORE INSERT ON "{schema}".outbox '
                f'FOR EACH ROW EXECUTE FUNCTION "{schema}".hie_test_disk_full()'
            )
        )
    try:
        yield
    finally:
        async with engine.begin() as conn:
            await conn.execute(text(f'DROP TRIGGER hie_test_disk_full ON "{schema}".outbox'))
            await conn.execute(text(f'DROP FUNCTION "{schema}".hie_test_disk_full()'))


async def test_disk_full_answers_503_with_a_reason_logs_once_and_recovers(
    faulty: FaultExchange, caplog: pytest.LogCaptureFixture
) -> None:
    exchange = faulty.exchange
    client = await exchange.member(name="磁盘测试医院")
    caplog.set_level(logging.ERROR, logger="hie.storage")
    async with _mpi_storage_full(exchange):
        answers = []
        for n in range(12):
            answer = await client.call(
                "POST", "/api/v1/patients", json={"local_id": f"D-{n}-{secrets.token_hex(2)}", **person("卫十三")}
            )
            answers.append(answer)
        statuses = [a.status_code for a in answers]
        assert 503 in statuses, statuses
        assert 500 not in statuses, statuses
        refused = [a for a in answers if a.status_code == 503]
        for answer in refused:
            assert answer.json()["error"]["reason"] == "storage-full", answer.text
            _assert_nothing_internal(answer)
        assert "卫十三" not in caplog.text
        # One line per burst (the burst state is the process's: the first backend's run logs it,
        # the second's, under a minute later, continues that burst).
        faults = [r.getMessage() for r in caplog.records if r.getMessage().startswith("storage-fault")]
        assert len(faults) <= 1, faults
        assert len(faults) == 1 or exchange.backend != "sqlite", faults
        assert all("component=mpi reason=storage-full" in line for line in faults), faults
    space_back = time.monotonic()
    recovered = await client.call(
        "POST", "/api/v1/patients", json={"local_id": f"D-ok-{secrets.token_hex(2)}", **person("蒋十四")}
    )
    assert recovered.status_code == 201, recovered.text
    print(
        f"\n[{exchange.backend}] disk full: {len(refused)} of {len(answers)} writes refused 503 storage-full, "
        f"{len(faults)} log line(s); first write after space returned answered in {time.monotonic() - space_back:.2f} s"
    )
