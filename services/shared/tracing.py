"""OpenTelemetry set-up, once per process: tracer provider, exporter and gRPC interceptors.

Span attributes carry organisation ids, operations and outcomes, never patient
identifiers or names.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

_log = logging.getLogger(__name__)


SAMPLE_RATIO_ENV = "HIE_TRACE_SAMPLE_RATIO"


def sampler_for(exporter: str, ratio: float | None = None, *, edge: bool = False) -> Sampler:
    """Which traces are recorded. The decision is taken once, where the exchange's trace starts
    (the gateway, the edge), and every service follows its parent's sampled flag, so a trace is
    recorded whole or not at all; a hospital's own `sampled` flag does not force recording at the
    edge. Unrecorded spans still carry the trace id (audit records keep it) and propagate it.
    Without an exporter nothing is recorded (spans no one receives cost CPU on every hop);
    with one, `ratio` (HIE_TRACE_SAMPLE_RATIO, default 1) of the traces."""
    if exporter == "none":
        ratio = 0.0
    root = TraceIdRatioBased(1.0 if ratio is None else min(1.0, max(0.0, ratio)))
    if edge:
        return ParentBased(root, remote_parent_sampled=root, remote_parent_not_sampled=root)
    return ParentBased(root)


def configure_tracing(
    service_name: str, exporter: str, *, edge: bool = False, sample_ratio: float | None = None
) -> TracerProvider:
    """Install the process's tracer provider; reuse one already installed (tests install their own).
    `edge`: the process where the exchange's traces start (the gateway); `sample_ratio`: the
    share of traces recorded there (HIE_TRACE_SAMPLE_RATIO; None: every one)."""
    existing = trace.get_tracer_provider()
    if isinstance(existing, TracerProvider):
        return existing
    ratio = sample_ratio
    provider = TracerProvider(
        resource=Resource.create({"service.name": service_name}), sampler=sampler_for(exporter, ratio, edge=edge)
    )
    span_exporter = _exporter(exporter)
    if span_exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(span_exporter))
    trace.set_tracer_provider(provider)
    return provider


def _exporter(kind: str) -> SpanExporter | None:
    if kind == "console":
        return ConsoleSpanExporter()
    if kind == "otlp":
        # Imported only when used: the OTLP exporter reads OTEL_EXPORTER_OTLP_* itself.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if kind != "none":
        _log.warning("unknown HIE_OTEL_EXPORTER %r; tracing without export", kind)
    return None


_HEALTH_SERVICE = "grpc.health.v1.Health"


def _not_health_check(details: Any) -> bool:
    """`filters.negate(filters.health_check())` for the call details gRPC hands the interceptors
    (server: `.method` of the C-level handler details; client: `grpc.aio.ClientCallDetails`,
    whose method may be bytes). OpenTelemetry's filter tries `isinstance` against gRPC's abstract
    classes first: 1.7 % of the registry's samples per document query under `hie bench load`
    (issue 21), for a string prefix test."""
    method = getattr(details, "method", "") or ""
    if isinstance(method, bytes):
        method = method.decode()
    return not method.lstrip("/").startswith(_HEALTH_SERVICE)


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    return [aio_server_interceptor(filter_=_not_health_check)]


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    return list(aio_client_interceptors(filter_=_not_health_check))


def annotate_caller(caller: Any) -> None:
    """The exchange's own attributes on the current span: who asked and why. Organisation and
    client ids only; never a patient's identifiers or a person's name."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes(
            {
                "hie.organization_id": caller.organization_id,
                "hie.organization_type": caller.organization_type,
                "hie.client_id": caller.client_id,
                "hie.role": caller.role,
                "hie.purpose_of_use": caller.purpose_of_use,
            }
        )


def current_trace_ids() -> tuple[str, str]:
    """Hex trace id and span id of the current span ("" when there is none)."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return "", ""
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


def remote_span_context(trace_id: str, span_id: str) -> SpanContext | None:
    """The (hex) span recorded earlier, as a remote span context; None if the ids are not valid."""
    try:
        context = SpanContext(
            trace_id=int(trace_id, 16),
            span_id=int(span_id, 16),
            is_remote=True,
            trace_flags=TraceFlags(TraceFlags.SAMPLED),
        )
    except ValueError:
        return None
    return context if context.is_valid else None


def remote_parent(trace_id: str, span_id: str) -> Context | None:
    """A context whose parent is the given (hex) span, to continue a trace recorded earlier."""
    parent = remote_span_context(trace_id, span_id)
    return trace.set_span_in_context(NonRecordingSpan(parent)) if parent else None


tracer = trace.get_tracer("hie")
