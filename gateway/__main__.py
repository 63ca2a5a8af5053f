"""Run the gateway: `python -m gateway` (HIE_LISTEN host:port, default 127.0.0.1:8400)."""

import uvicorn

from gateway.app import create_app
from services.shared.config import Settings
from services.shared.server import configure_logging
from services.shared.tracing import configure_tracing


def main() -> None:
    settings = Settings.from_env()
    configure_logging(settings.log_level)
    configure_tracing("gateway", settings.otel_exporter)
    host, _, port = settings.listen_for("gateway").rpartition(":")
    uvicorn.run(
        create_app(settings),
        host=host,
        port=int(port),
        log_level=settings.log_level.lower(),
        # Access logs carry query strings, which can hold patient ids: off.
        access_log=False,
        proxy_headers=False,
        timeout_graceful_shutdown=10,
        # Each request starts from an empty context: asyncio can carry one request's context vars
        # (its trace) into the connection's later requests (cpython#140947), e.g. after a
        # streamed response.
        reset_contextvars=True,
    )


if __name__ == "__main__":
    main()
