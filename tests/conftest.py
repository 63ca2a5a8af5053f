"""Fixtures that build real things: keys, tokens, gRPC servers on loopback ports, the
gateway over real HTTP, on SQLite and (when HIE_TEST_DATABASE_URL is set) PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from gateway.app import create_app
from gateway.client import HospitalClient, Practitioner
from gateway.organizations import register_organization
from gateway.serving import scheme, uvicorn_config
from services.shared.components import DATABASE_COMPONENTS, SERVICES
from services.shared.config import Settings
from services.shared.keys import ensure_exchange_keys, generate_ec_key, jwks
from services.shared.metrics import configure_metrics
from services.shared.outbox import Outbox
from services.shared.process import RunningService, start_service

POSTGRES_URL = os.environ.get("HIE_TEST_DATABASE_URL", "")
# The tests' webhook receivers listen on this machine: loopback endpoints are allowed explicitly
# (never by default; services/registry/dsub.py EndpointPolicy).
os.environ.setdefault("HIE_NOTIFY_ALLOW_LOOPBACK", "true")

# One tracer provider for the whole test process, exporting to memory, installed before any
# server or instrumentation is created.
SPANS = InMemorySpanExporter()
_provider = TracerProvider()
_provider.add_span_processor(SimpleSpanProcessor(SPANS))
trace.set_tracer_provider(_provider)
# One meter provider too (Prometheus reader): tests scrape what the exchange's processes expose.
configure_metrics("tests", "none")

# Modules that read the test process's own scrape page run first, while the page is small: every
# exchange the run starts reports into this one process, and by the end of the e2e tests the page
# holds many thousands of series (each test's organisations, routes and histograms), which made a
# scrape take seconds (`hie status`'s 3 s scrape timeout ran out) and starved the exchange under
# test. After pytest's own reordering by fixture parameters (trylast), order kept otherwise.
_READ_THE_PROCESS_SCRAPE_PAGE = ("tests/e2e/test_metrics.py",)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    first = [i for i in items if i.nodeid.split("::", 1)[0] in _READ_THE_PROCESS_SCRAPE_PAGE]
    if first:
        items[:] = first + [i for i in items if i.nodeid.split("::", 1)[0] not in _READ_THE_PROCESS_SCRAPE_PAGE]


@dataclass
class Exchange:
    """A whole exchange running in the test process: six services and the gateway."""

    backend: str
    settings: Settings
    base_url: str
    services: dict[str, RunningService]
    # Outboxes outside the services (the gateway's), drained with theirs.
    other_outboxes: list[Outbox] = dataclasses.field(default_factory=list)

    async def member(
        self, *, type: str = "hospital", scopes: str | None = None, name: str = "测试医院"
    ) -> HospitalClient:
        """A newly registered member organisation with a fresh key, as its system would act."""
        key = generate_ec_key()
        org_id = f"{type[:4]}-{secrets.token_hex(4)}"
        org = await register_organization(self.settings, org_id=org_id, name=name, type=type, jwks=jwks(key))
        client = HospitalClient(base_url=self.base_url, client_id=org.client_id, key=key)
        if scopes is not None:
            client.scopes = scopes
        if type == "authority":
            client.practitioner = Practitioner(id="AUD-1", name="陈审计", role="auditor", department="医政医管处")
        client.org_id = org_id  # type: ignore[attr-defined]
        return client

    async def audit_settled(self) -> None:
        """Wait until every service's outbox has delivered its audit events."""
        for _ in range(200):
            pending = 0
            for outbox in [*(r.runtime.outbox for r in self.services.values()), *self.other_outboxes]:
                await outbox.relay_once()
                pending += await outbox.pending()
            if pending == 0:
                return
            await asyncio.sleep(0.02)
        raise AssertionError("audit events were not delivered")


def _loopback_socket() -> socket.socket:
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets that name it, and without
    # it every response waits ~40 ms on Nagle's algorithm and the client's delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@dataclass
class RunningGateway:
    settings: Settings
    base_url: str
    server: uvicorn.Server
    task: asyncio.Task[None]

    async def stop(self) -> None:
        self.server.should_exit = True
        await self.task


async def serve_gateway(settings: Settings) -> RunningGateway:
    """The gateway app on a real loopback port; `settings.public_url` is set to it."""
    sock = _loopback_socket()
    base_url = f"{scheme(settings)}://127.0.0.1:{sock.getsockname()[1]}"
    settings = dataclasses.replace(settings, public_url=base_url)
    server = uvicorn.Server(uvicorn_config(create_app(settings), settings, log_level="warning"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    return RunningGateway(settings, base_url, server, task)


def _backends() -> list[pytest.param]:
    return [
        pytest.param("sqlite", id="sqlite"),
        pytest.param(
            "postgres",
            id="postgres",
            marks=pytest.mark.skipif(not POSTGRES_URL, reason="HIE_TEST_DATABASE_URL not set"),
        ),
    ]


@pytest.fixture(scope="session")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("keys")
    ensure_exchange_keys(directory)
    return directory


def base_settings(data_dir: Path, keys_dir: Path, backend: str) -> Settings:
    env = {
        "HIE_DATA_DIR": str(data_dir),
        "HIE_TRUSTED_JWKS_FILE": str(keys_dir / "trusted.jwks.json"),
        "HIE_GATEWAY_SIGNING_KEY_FILE": str(keys_dir / "gateway.pem"),
        "HIE_SERVICE_SIGNING_KEY_FILE": str(keys_dir / "platform.pem"),
        # Revocation seen on the next request (the cache is tested on its own).
        "HIE_REVOCATION_CHECK_SECONDS": "0",
    }
    if backend == "postgres":
        env["HIE_DATABASE_URL"] = POSTGRES_URL
        env["HIE_DB_SCHEMA_PREFIX"] = f"t{secrets.token_hex(3)}_"
    return Settings.from_env(env)


async def drop_schemas(settings: Settings) -> None:
    if not settings.database_url:
        return
    engine = create_async_engine(settings.database_url)
    async with engine.begin() as conn:
        for component in DATABASE_COMPONENTS:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{settings.schema_for(component)}" CASCADE'))
    await engine.dispose()


async def start_exchange(settings: Settings, backend: str) -> tuple[Exchange, RunningGateway]:
    services: dict[str, RunningService] = {}
    # In the component list's order: audit first (everyone relays to it), then mpi and consent
    # (the registry calls them).
    for spec in (c.spec() for c in SERVICES):
        running = await start_service(spec, settings, listen="127.0.0.1:0")
        services[spec.name] = running
        settings = dataclasses.replace(settings, targets={**settings.targets, spec.name: f"127.0.0.1:{running.port}"})
    for running in services.values():
        running.runtime.settings = settings
    gateway = await serve_gateway(settings)
    exchange = Exchange(backend, gateway.settings, gateway.base_url, services)
    exchange.other_outboxes.append(gateway.server.config.app.state.outbox)
    return exchange, gateway


@pytest.fixture(scope="session", params=_backends())
async def exchange(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, keys_dir: Path
) -> AsyncIterator[Exchange]:
    backend = request.param
    settings = base_settings(tmp_path_factory.mktemp(f"exchange-{backend}"), keys_dir, backend)
    running, gateway = await start_exchange(settings, backend)
    try:
        yield running
    finally:
        await gateway.stop()
        for service in running.services.values():
            await service.stop(grace=None)
        await drop_schemas(settings)


@pytest.fixture
def spans() -> InMemorySpanExporter:
    SPANS.clear()
    return SPANS
