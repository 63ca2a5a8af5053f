"""Runs one exchange service: settings, database and migrations, outbox relay, gRPC server.

Each service describes itself with a `ServiceSpec`; `main(spec)` runs it as a process and
`start_service(spec, settings)` starts it inside a running event loop (tests bind port 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health
from sqlalchemy import MetaData
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from hie.audit.v1 import audit_pb2_grpc
from services.shared import migrations
from services.shared.audit_trail import AUDIT_TOPIC, AuditTrail, audit_sender
from services.shared.auth import PlatformCredentials, TokenVerifier
from services.shared.clients import open_channel
from services.shared.config import ComponentSettings, Settings, UnsafeSettingsError, settings_or_exit
from services.shared.db import engine_for, session_factory
from services.shared.invalidation import Replicas
from services.shared.metrics import start_metrics, watch_service
from services.shared.outbox import Outbox
from services.shared.protection import DataProtection
from services.shared.protection.rotation import ProtectedColumns, WrappedContentKeys
from services.shared.server import (
    ServicerBinding,
    configure_logging,
    create_health_server,
    create_server,
    run_until_signalled,
)
from services.shared.tracing import configure_tracing


@dataclass
class ServiceRuntime:
    """What a service's servicer works with: its database, outbox, audit trail and peers."""

    name: str
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    outbox: Outbox
    audit: AuditTrail
    credentials: PlatformCredentials
    verifier: TokenVerifier | None = None
    # Field encryption, blind indexes, document key wrapping and masking (services/shared/protection).
    protection: DataProtection | None = None
    # The component's own registered settings (services/shared/config.py COMPONENT_SETTINGS),
    # read from the environment when it starts.
    options: ComponentSettings = field(default_factory=lambda: ComponentSettings(""))
    _channels: dict[str, grpc.aio.Channel] = field(default_factory=dict)
    _replicas: dict[str, Replicas] = field(default_factory=dict)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def background(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run a task for the life of the service; it is cancelled on close."""
        self._tasks.append(asyncio.create_task(coro, name=name))

    def channel(self, service: str) -> grpc.aio.Channel:
        """A channel to a peer service, opened on first use."""
        if service not in self._channels:
            self._channels[service] = open_channel(
                self.settings.targets[service], credentials=self.credentials, tls=self.settings.grpc_tls
            )
        return self._channels[service]

    def replicas(self, service: str) -> Replicas:
        """Every replica of a peer service, for invalidations each must receive: the addresses
        HIE_<SERVICE>_REPLICAS names (registered for this component), else the service's target."""
        configured = (self.options.get(f"HIE_{service.upper()}_REPLICAS") or "", self.settings.targets[service])
        known = self._replicas.get(service)
        if known is None or known.configured != configured:
            if known is not None:
                self.background(known.close(), name=f"close {service} replicas")
            self._replicas[service] = Replicas(
                service,
                configured[0],
                fallback=configured[1],
                component=self.name,
                credentials=self.credentials,
                tls=self.settings.grpc_tls,
            )
        return self._replicas[service]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.outbox.stop()
        for channel in self._channels.values():
            await channel.close()
        for replicas in self._replicas.values():
            await replicas.close()
        await self.engine.dispose()


@dataclass(frozen=True)
class ServiceSpec:
    """A service: its name, tables, migration scripts and how to build its servicers."""

    name: str
    metadata: MetaData
    versions: Path
    build: Callable[[ServiceRuntime], Sequence[ServicerBinding]]
    # The audit service records its own events directly, not through a relay to itself.
    relays_audit: bool = True
    # Stores direct identifiers or document content: loads the data keys (only these services
    # get the key file mounted in production).
    protects_personal_data: bool = False
    # What `hie keys rotate-data` re-encrypts / re-wraps in this service's schema.
    protected: tuple[ProtectedColumns | WrappedContentKeys, ...] = ()


@dataclass
class RunningService:
    spec: ServiceSpec
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    runtime: ServiceRuntime

    health_server: grpc.aio.Server | None = None
    # The servicer objects it serves, by the gRPC service's full name (tests look at their state).
    servicers: dict[str, Any] = field(default_factory=dict)

    async def stop(self, grace: float | None = 1.0) -> None:
        await self.server.stop(grace)
        if self.health_server is not None:
            await self.health_server.stop(grace)
        await self.runtime.close()


async def start_service(spec: ServiceSpec, settings: Settings, *, listen: str | None = None) -> RunningService:
    """Migrate the service's schema, start its outbox relay and serve it."""
    engine = engine_for(settings, spec.name)
    protection = DataProtection.from_settings(settings) if spec.protects_personal_data else None
    await migrations.upgrade(
        engine,
        schema=settings.schema_for(spec.name),
        versions=spec.versions,
        metadata=spec.metadata,
        protection=protection,
    )
    sessions = session_factory(engine)
    outbox = Outbox(spec.metadata.tables["outbox"], sessions)
    outbox.lease = timedelta(seconds=settings.outbox_lease_seconds)
    credentials = PlatformCredentials.from_file(
        settings.service_signing_key_file, service=spec.name, issuer=f"urn:hie:service:{spec.name}"
    )
    runtime = ServiceRuntime(
        name=spec.name,
        settings=settings,
        engine=engine,
        sessions=sessions,
        outbox=outbox,
        audit=AuditTrail(outbox, service=spec.name),
        credentials=credentials,
        verifier=TokenVerifier(settings.trusted_jwks_file),
        protection=protection,
        options=ComponentSettings.from_env(spec.name),
    )
    for name in runtime.options.given:
        if name.endswith("_REPLICAS"):
            # A malformed replica list refuses the start, not the first write that tells them.
            runtime.options.value(name)
    if spec.relays_audit:
        outbox.register(AUDIT_TOPIC, audit_sender(audit_pb2_grpc.AuditLogStub(runtime.channel("audit")), credentials))
    bindings = spec.build(runtime)
    server, port, health_servicer = await create_server(
        bindings=bindings,
        listen=listen or settings.listen_for(spec.name),
        verifier=runtime.verifier,
        tls=settings.grpc_tls,
        component=spec.name,
    )
    health_server = (
        await create_health_server(settings.health_listen, health_servicer) if settings.health_listen else None
    )
    outbox.start()
    watch_service(runtime)
    return RunningService(
        spec=spec,
        server=server,
        port=port,
        health=health_servicer,
        runtime=runtime,
        health_server=health_server,
        servicers={name: servicer for _add, servicer, name in bindings},
    )


def main(spec: ServiceSpec) -> None:
    """Entry point of `python -m services.<name>`."""
    settings = settings_or_exit(spec.name)
    configure_logging(settings.log_level)
    configure_tracing(spec.name, settings.otel_exporter, sample_ratio=settings.trace_sample_ratio)
    start_metrics(spec.name, settings)

    async def serve() -> None:
        running = await start_service(spec, settings)
        try:
            await run_until_signalled(running.server, running.health)
        finally:
            if running.health_server is not None:
                await running.health_server.stop(1)
            await running.runtime.close()

    try:
        asyncio.run(serve())
    except UnsafeSettingsError as exc:
        sys.stderr.write(f"{spec.name}: {exc}\n")
        raise SystemExit(2) from None
