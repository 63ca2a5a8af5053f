"""Run the gateway: `python -m gateway` (HIE_LISTEN host:port, default 127.0.0.1:8400)."""

import uvicorn

from gateway.app import create_app
from gateway.serving import uvicorn_config
from services.shared.config import settings_or_exit
from services.shared.metrics import start_metrics
from services.shared.server import configure_logging
from services.shared.tracing import configure_tracing


def main() -> None:
    settings = settings_or_exit("gateway")
    configure_logging(settings.log_level)
    configure_tracing("gateway", settings.otel_exporter, edge=True, sample_ratio=settings.trace_sample_ratio)
    start_metrics("gateway", settings)
    host, _, port = settings.listen_for("gateway").rpartition(":")
    uvicorn.Server(uvicorn_config(create_app(settings), settings, host=host, port=int(port))).run()


if __name__ == "__main__":
    main()
