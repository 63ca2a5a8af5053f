"""The HL7 v2 ingress (gateway/mllp) as tests run it: a task in the test process listening on a
real loopback port and calling a real mpi gRPC server, and an MLLP client as a legacy HIS is."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import hl7.mllp

from gateway.mllp.feed import AdtFeed, FacilityDirectory, FeedCredentials, OrganisationRegistry, serve
from services.shared.clients import open_channel
from services.shared.config import Settings
from services.shared.db import engine_for, session_factory


@asynccontextmanager
async def running_ingress(
    settings: Settings, *, directory: FacilityDirectory | None = None, port: int = 0
) -> AsyncIterator[int]:
    """The ingress against `settings.targets["mpi"]`; yields its MLLP port. Without a directory,
    the facilities are the gateway's registered hospitals (its database, read only)."""
    engine = None
    if directory is None:
        engine = engine_for(settings, "gateway")
        directory = OrganisationRegistry(session_factory(engine), ttl=0)
    assert settings.gateway_signing_key_file is not None
    channel = open_channel(settings.targets["mpi"], tls=settings.grpc_tls)
    feed = AdtFeed(
        channel=channel,
        directory=directory,
        credentials=FeedCredentials(signing_key_file=settings.gateway_signing_key_file, issuer=settings.public_url),
        timeout=5.0,
    )
    server = await serve(feed, host="127.0.0.1", port=port)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()
        await channel.close()
        if engine is not None:
            await engine.dispose()


async def send(port: int, payload: bytes, *, wait: float = 30) -> bytes:
    """One message on a new connection, as a HIS sends it with the `hl7` package; its ACK."""
    reader, writer = await hl7.mllp.open_hl7_connection("127.0.0.1", port)
    try:
        writer.writeblock(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.readblock(), timeout=wait)
    finally:
        writer.close()
