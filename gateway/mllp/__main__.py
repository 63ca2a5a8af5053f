"""Run the HL7 v2 ingress: `python -m gateway.mllp [--port P] [--host H] [--facility F ...]`.

Listens on HIE_MLLP_HOST:HIE_MLLP_PORT (default 127.0.0.1:2575; the options override them) and
calls the mpi at HIE_MPI_TARGET. Reads the gateway's organisation registry (its database) to know
the member hospitals, unless `--facility` names the accepted senders; opens no service's database.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

from gateway.mllp.feed import AdtFeed, FacilityDirectory, FeedCredentials, OrganisationRegistry, StaticDirectory, serve
from services.shared.clients import open_channel
from services.shared.config import Settings, UnsafeSettingsError
from services.shared.db import engine_for, session_factory
from services.shared.server import configure_logging
from services.shared.tracing import configure_tracing


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m gateway.mllp", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=None, help="TCP port (default HIE_MLLP_PORT, 2575)")
    parser.add_argument("--host", default=None, help="address to listen on (default HIE_MLLP_HOST, 127.0.0.1)")
    parser.add_argument(
        "--facility", action="append", default=None, help="accept only these sending facilities (MSH-4), repeatable"
    )
    return parser.parse_args(argv)


async def run(settings: Settings, *, host: str, port: int, facilities: set[str] | None = None) -> None:
    """Serve until cancelled or SIGTERM / SIGINT."""
    if settings.gateway_signing_key_file is None:
        raise UnsafeSettingsError("the ingress needs HIE_GATEWAY_SIGNING_KEY_FILE")
    credentials = FeedCredentials(signing_key_file=settings.gateway_signing_key_file, issuer=settings.public_url)
    credentials.check()
    engine = None
    directory: FacilityDirectory
    if facilities:
        directory = StaticDirectory(facilities)
    else:
        # The gateway's own database, read only: never migrated or written from here.
        engine = engine_for(settings, "gateway")
        directory = OrganisationRegistry(session_factory(engine))
    channel = open_channel(settings.targets["mpi"], tls=settings.grpc_tls)
    feed = AdtFeed(channel=channel, directory=directory, credentials=credentials)
    server = await serve(feed, host=host, port=port)
    bound = server.sockets[0].getsockname()[1] if server.sockets else port
    print(f"mllp         {host}:{bound} (HL7 v2 ADT → mpi at {settings.targets['mpi']})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        server.close()
        await server.wait_closed()
        await channel.close()
        if engine is not None:
            await engine.dispose()


def main(argv: list[str] | None = None) -> None:
    args = _arguments(argv)
    try:
        settings = Settings.from_env()
    except (UnsafeSettingsError, ValueError) as exc:
        print(f"mllp: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings.log_level)
    configure_tracing("mllp", settings.otel_exporter, sample_ratio=settings.trace_sample_ratio)
    host = args.host or settings.mllp_host
    port = settings.mllp_port if args.port is None else args.port
    try:
        asyncio.run(run(settings, host=host, port=port, facilities=set(args.facility or ())))
    except (OSError, ValueError) as exc:
        # A taken port, a missing or unreadable key: a clear line, never a traceback.
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        if isinstance(exc, OSError) and exc.filename:
            detail += f": {exc.filename}"
        print(f"mllp: cannot start: {detail}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
