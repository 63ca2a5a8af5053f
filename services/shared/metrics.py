"""Operations metrics through the OpenTelemetry metrics API, once per process: the meter provider,
its readers (Prometheus scrape endpoint, OTLP push), and every instrument the exchange records.

Every instrument is declared here, so the alert rules (deploy/prometheus/rules.yaml) can be
checked against the names the code registers (`INSTRUMENTS`). Names are `hie.*`, units are UCUM
(`s`, `{request}`), and attributes are few and bounded: a templated route, an RPC name, a
component, an organisation id, a status or a machine-readable reason — never a patient's
identifier, a name or a raw URL path (they can carry identifiers).

Values that live in a database (an outbox's backlog, the MPI review queue) are sampled by a
background task (`sample_forever`) every `HIE_METRICS_SAMPLE_SECONDS` and reported by observable
gauges: a scrape never queries a database, and a stopped relay still shows its growing backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource

_log = logging.getLogger(__name__)
_meter = metrics.get_meter("hie")

# Latency buckets (seconds) for requests and RPCs: the targets are p99 ≤ 15-50 ms, so
# the resolution is finest there; the last buckets catch a request that queued for seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class Instrument:
    """One declared instrument: its OpenTelemetry name, kind, unit and attribute keys."""

    name: str
    kind: str  # counter | histogram | gauge
    unit: str
    description: str
    attributes: tuple[str, ...]

    @property
    def prometheus_names(self) -> tuple[str, ...]:
        """The series names a Prometheus scrape shows for it (the exporter's translation)."""
        base = self.name.replace(".", "_")
        suffix = {"s": "_seconds", "By": "_bytes"}.get(self.unit, "")
        if suffix and not base.endswith(suffix):
            base += suffix
        if self.kind == "counter":
            return (f"{base}_total",)
        if self.kind == "histogram":
            return (f"{base}_bucket", f"{base}_count", f"{base}_sum")
        return (base,)


INSTRUMENTS: dict[str, Instrument] = {}


def _declare(name: str, kind: str, unit: str, description: str, *attributes: str) -> Instrument:
    instrument = Instrument(name, kind, unit, description, attributes)
    INSTRUMENTS[name] = instrument
    return instrument


def _counter(name: str, unit: str, description: str, *attributes: str) -> metrics.Counter:
    _declare(name, "counter", unit, description, *attributes)
    return _meter.create_counter(name, unit=unit, description=description)


def _histogram(name: str, unit: str, description: str, *attributes: str) -> metrics.Histogram:
    _declare(name, "histogram", unit, description, *attributes)
    return _meter.create_histogram(name, unit=unit, description=description)


class SampledGauge:
    """An observable gauge reporting the last value set per attribute set (by a sampler task)."""

    def __init__(self, name: str, unit: str, description: str, *attributes: str) -> None:
        _declare(name, "gauge", unit, description, *attributes)
        self._values: dict[tuple[tuple[str, str], ...], float] = {}
        self._lock = threading.Lock()
        _meter.create_observable_gauge(name, callbacks=[self._observe], unit=unit, description=description)

    def set(self, value: float, attributes: dict[str, str]) -> None:
        with self._lock:
            self._values[tuple(sorted(attributes.items()))] = value

    def clear(self, attributes: dict[str, str]) -> None:
        """Stop reporting a series (e.g. a bulk load that finished)."""
        with self._lock:
            self._values.pop(tuple(sorted(attributes.items())), None)

    def value(self, attributes: dict[str, str]) -> float | None:
        with self._lock:
            return self._values.get(tuple(sorted(attributes.items())))

    def _observe(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            items = list(self._values.items())
        return [Observation(value, dict(key)) for key, value in items]


# --- requests -------------------------------------------------------------------------------
# The gateway's HTTP requests: `route` is the route's template (/api/v1/documents/{document_id}),
# "unmatched" when no route matched: never the path as sent.
HTTP_REQUESTS = _counter(
    "hie.http.server.requests", "{request}", "HTTP requests answered by the gateway", "route", "method", "status"
)
HTTP_DURATION = _histogram("hie.http.server.duration", "s", "Gateway request latency", "route", "method")
HTTP_ERRORS = _counter(
    "hie.http.server.errors", "{request}", "Gateway error answers by reason", "route", "status", "reason"
)
# Each service's gRPC calls: `method` is the RPC's full name (/hie.registry.v1.Registry/Query).
RPC_REQUESTS = _counter(
    "hie.rpc.server.requests", "{call}", "gRPC calls answered by a service", "component", "method", "code"
)
RPC_DURATION = _histogram("hie.rpc.server.duration", "s", "gRPC call latency", "component", "method")
RPC_ERRORS = _counter(
    "hie.rpc.server.errors", "{call}", "gRPC error answers by reason", "component", "method", "code", "reason"
)

# --- access control ---------------------------------------------------------------------------
CONSENT_DENIALS = _counter(
    "hie.consent.denials", "{decision}", "Documents a consent decision refused, by the rule that decided", "basis"
)
BREAK_GLASS_ACCESSES = _counter(
    "hie.consent.break_glass.accesses", "{decision}", "Documents opened by break-the-glass (emergency access)"
)
BREAK_GLASS_DECLARATIONS = _counter(
    "hie.consent.break_glass.declarations", "{declaration}", "Break-the-glass declarations made", "organization"
)
# Token endpoint outcomes per member organisation ("unknown" for a client id nobody registered:
# an attacker's made-up ids must not grow the label set).
TOKENS = _counter(
    "hie.oauth.tokens", "{token}", "Access tokens issued and refused", "organization", "outcome", "reason"
)

# --- delivery ------------------------------------------------------------------------------
OUTBOX_DELIVERED = _counter(
    "hie.outbox.delivered", "{message}", "Outbox messages acknowledged by their receiver", "component", "topic"
)
OUTBOX_FAILURES = _counter(
    "hie.outbox.failures", "{message}", "Outbox delivery attempts that failed (retried later)", "component", "topic"
)
OUTBOX_DEAD_LETTERS = _counter(
    "hie.outbox.dead_letters", "{message}", "Outbox messages given up on", "component", "topic"
)
OUTBOX_BACKLOG = SampledGauge("hie.outbox.backlog", "{message}", "Outbox messages not yet acknowledged", "component")
OUTBOX_OLDEST_AGE = SampledGauge(
    "hie.outbox.oldest_age", "s", "Age of the oldest unacknowledged outbox message (0 when none)", "component"
)
# Cache invalidations a writer (mpi, consent) sent a replica of `peer` (the registry) that did not
# acknowledge them: that replica's kept entries are then stale up to their own lifetime.
INVALIDATIONS_UNACKNOWLEDGED = _counter(
    "hie.invalidation.unacknowledged",
    "{replica}",
    "Cache invalidations a peer replica did not acknowledge, by status code",
    "component",
    "peer",
    "code",
)
# Subscription notifications (the registry's broker): outcome delivered | retry | dead-letter.
NOTIFICATIONS = _counter("hie.notify.deliveries", "{attempt}", "Notification delivery attempts by outcome", "outcome")

# --- stewardship ----------------------------------------------------------------------------
MPI_REVIEW_QUEUE = SampledGauge("hie.mpi.review_queue.size", "{task}", "Open MPI review tasks")
BULK_LOAD_ROWS = SampledGauge(
    "hie.mpi.bulk_load.rows", "{row}", "Rows done by a bulk load updated within the last hour", "domain"
)
AUDIT_CHECKPOINT_AGE = SampledGauge(
    "hie.audit.checkpoint.age", "s", "Seconds since the audit chain's last signed checkpoint"
)
AUDIT_UNSIGNED_AGE = SampledGauge(
    "hie.audit.unsigned_age", "s", "Age of the oldest audit record no checkpoint covers yet (0 when none)"
)
# The running code's version, one series per process (value 1), for `hie status` and dashboards.
BUILD_INFO = SampledGauge("hie.build.info", "", "Version of the running component", "component", "version")
# TLS / HTTPS certificates' notAfter (Unix time); alert some days ahead.
CREDENTIAL_EXPIRY = SampledGauge(
    "hie.credential.expiry", "s", "Unix time at which a certificate expires", "component", "credential"
)
# The existing storage-fault counter (services/shared/storage_faults.py) belongs to the set.
_declare(
    "hie.storage.faults", "counter", "{fault}", "Database operations refused by a storage fault", "component", "reason"
)


def configure_metrics(service_name: str, exporter: str, *, prometheus: bool = True) -> MeterProvider:
    """Install the process's meter provider (reuse one already installed): a Prometheus reader
    when `prometheus`, and an OTLP push reader when the exporter is "otlp"."""
    existing = metrics.get_meter_provider()
    if isinstance(existing, MeterProvider):
        return existing
    readers: list[MetricReader] = []
    if prometheus:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader

        readers.append(PrometheusMetricReader(disable_target_info=True))
    if exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    views = [
        View(instrument_name=name, aggregation=ExplicitBucketHistogramAggregation(LATENCY_BUCKETS))
        for name, instrument in INSTRUMENTS.items()
        if instrument.kind == "histogram"
    ]
    provider = MeterProvider(
        metric_readers=readers,
        resource=Resource.create({"service.name": service_name}),
        views=views,
        # Exemplars (trace ids on samples) are not shown by the Prometheus text format and cost a
        # reservoir update on every measurement inside a sampled span: off.
        exemplar_filter=AlwaysOffExemplarFilter(),
    )
    metrics.set_meter_provider(provider)
    return provider


def serve_metrics(listen: str) -> tuple[Any, int]:
    """Serve the Prometheus text format on `host:port` (port 0: a free one) in a daemon thread;
    returns the server and its port. The page carries counts and durations, never data."""
    from prometheus_client import start_http_server

    host, _, port = listen.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host or "127.0.0.1")
    return server, int(server.server_port)


def start_metrics(service_name: str, settings: Any) -> int | None:
    """A process's metrics as its settings ask: a scrape endpoint when HIE_METRICS_LISTEN is set,
    OTLP push when HIE_OTEL_EXPORTER=otlp. With neither, no meter provider is installed and every
    instrument stays the API's no-op (nothing recorded, nothing spent). Returns the bound port."""
    if not settings.metrics_listen and settings.otel_exporter != "otlp":
        return None
    configure_metrics(service_name, settings.otel_exporter, prometheus=bool(settings.metrics_listen))
    BUILD_INFO.set(1, {"component": service_name, "version": version()})
    if not settings.metrics_listen:
        return None
    _server, port = serve_metrics(settings.metrics_listen)
    _log.info("metrics on http://%s/metrics", settings.metrics_listen.rpartition(":")[0] + f":{port}")
    return port


def version() -> str:
    """The installed exchange's version ("unknown" when run from a tree that is not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("hie-exchange")
    except PackageNotFoundError:
        return "unknown"


Probe = Callable[[], Awaitable[None]]


# A probe still running after this long (or after its interval, if longer) is abandoned and
# tried again next time: one hung query must not freeze a gauge at its last value for good.
PROBE_TIMEOUT_SECONDS = 10.0


async def sample_forever(probe: Probe, interval: float, *, name: str) -> None:
    """Run `probe` now and every `interval` seconds until this task is cancelled. A failing probe
    (a database that is down), one that hangs past its timeout, and one that raises a
    CancelledError not addressed to this task (an inner call cancelled by someone else) are
    logged by type and tried again next time: the sampler outlives them all."""
    timeout = max(interval, PROBE_TIMEOUT_SECONDS)
    while True:
        try:
            async with asyncio.timeout(timeout):
                await probe()
        except asyncio.CancelledError:
            if owner_cancelled():
                raise
            _log.warning("metrics probe %s was cancelled from inside; sampling on", name)
        except Exception as exc:
            _log.warning("metrics probe %s failed: %s", name, type(exc).__name__)
        if owner_cancelled():  # cancelled, but a layer below swallowed the CancelledError
            raise asyncio.CancelledError
        await asyncio.sleep(interval)


def owner_cancelled() -> bool:
    """Whether the running task itself is being cancelled (its owner stopping it), as opposed to
    a CancelledError that escaped from something it awaited (Python 3.11 `Task.cancelling`)."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def outbox_probe(outbox: Any, component: str) -> Probe:
    """Samples an outbox's backlog and the age of its oldest unacknowledged message."""

    async def probe() -> None:
        pending, oldest = await outbox.backlog()
        attributes = {"component": component}
        OUTBOX_BACKLOG.set(pending, attributes)
        OUTBOX_OLDEST_AGE.set(0.0 if oldest is None else max(0.0, time.time() - oldest.timestamp()), attributes)

    return probe


def certificate_probe(component: str, certificates: dict[str, Any]) -> Probe:
    """Reads each named PEM certificate file's notAfter (a renewed file shows on the next sample)."""

    async def probe() -> None:
        from cryptography import x509

        for credential, path in certificates.items():
            if path is None:
                continue
            with contextlib.suppress(OSError, ValueError):
                cert = x509.load_pem_x509_certificate(path.read_bytes())
                CREDENTIAL_EXPIRY.set(
                    cert.not_valid_after_utc.timestamp(), {"component": component, "credential": credential}
                )

    return probe


def watch_service(runtime: Any) -> None:
    """Start a service's samplers (its outbox and its certificates) as background tasks."""
    settings = runtime.settings
    runtime.outbox.component = runtime.name
    runtime.background(
        sample_forever(outbox_probe(runtime.outbox, runtime.name), settings.metrics_sample_seconds, name="outbox"),
        name="metrics-outbox",
    )
    tls = settings.grpc_tls
    if tls is not None:
        probe = certificate_probe(runtime.name, {"grpc-tls": tls.cert_file})
        runtime.background(sample_forever(probe, settings.metrics_sample_seconds, name="certs"), name="metrics-certs")


def watch_gateway(outbox: Any, settings: Any) -> list[asyncio.Task[None]]:
    """The gateway's samplers (its audit outbox, its HTTPS and gRPC client certificates); the
    caller cancels the tasks on shutdown."""
    outbox.component = "gateway"
    interval = settings.metrics_sample_seconds
    certificates = {"https": settings.https_cert_file}
    if settings.grpc_tls is not None:
        certificates["grpc-tls"] = settings.grpc_tls.cert_file
    probes = [("outbox", outbox_probe(outbox, "gateway")), ("certs", certificate_probe("gateway", certificates))]
    return [
        asyncio.create_task(sample_forever(probe, interval, name=name), name=f"metrics-{name}")
        for name, probe in probes
    ]


def record_decisions(verdicts: Iterable[Any]) -> None:
    """Count a consent decision's denials (by the rule that decided) and break-the-glass accesses."""
    for verdict in verdicts:
        if verdict.break_glass:
            BREAK_GLASS_ACCESSES.add(1)
        elif verdict.decision.value == "deny":
            CONSENT_DENIALS.add(1, {"basis": verdict.basis})
