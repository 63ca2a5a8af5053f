"""Trace sampling: decided once at the edge, followed by every service, the trace id kept on
unrecorded spans (audit records and downstream calls carry it either way)."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from services.shared.tracing import sampler_for

HOSPITAL_TRACE = 0x4BF92F3577B34DA6A3CE929D0E0E4736


def _tracer(exporter: str, ratio: float | None, *, edge: bool) -> tuple[trace.Tracer, InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler_for(exporter, ratio, edge=edge))
    provider.add_span_processor(SimpleSpanProcessor(spans))
    return provider.get_tracer("test"), spans


def _remote_parent(sampled: bool) -> trace.Context:
    flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
    parent = SpanContext(trace_id=HOSPITAL_TRACE, span_id=0x00F067AA0BA902B7, is_remote=True, trace_flags=flags)
    return trace.set_span_in_context(NonRecordingSpan(parent))


def test_the_edge_does_not_let_a_callers_sampled_flag_force_recording() -> None:
    edge, spans = _tracer("otlp", 0.0, edge=True)
    with edge.start_as_current_span("GET /api/v1/documents", context=_remote_parent(sampled=True)) as span:
        assert not span.is_recording()
        # The exchange's one trace goes on: same trace id, propagated downstream unsampled.
        assert span.get_span_context().trace_id == HOSPITAL_TRACE
        assert span.get_span_context().is_valid
        assert not span.get_span_context().trace_flags.sampled
    assert spans.get_finished_spans() == ()


def test_services_follow_the_edges_decision_so_a_trace_is_recorded_whole() -> None:
    service, spans = _tracer("otlp", 0.0, edge=False)
    with service.start_as_current_span("FindDocuments", context=_remote_parent(sampled=True)) as span:
        assert span.is_recording()
    with service.start_as_current_span("FindDocuments", context=_remote_parent(sampled=False)) as span:
        assert not span.is_recording()
        assert span.get_span_context().trace_id == HOSPITAL_TRACE
    assert [s.context.trace_id for s in spans.get_finished_spans()] == [HOSPITAL_TRACE]


def test_with_an_exporter_every_trace_is_recorded_by_default_and_none_without_one() -> None:
    recorded, spans = _tracer("otlp", None, edge=True)
    with recorded.start_as_current_span("x", context=_remote_parent(sampled=False)) as span:
        assert span.is_recording()
    assert len(spans.get_finished_spans()) == 1
    silent, nothing = _tracer("none", 1.0, edge=True)
    with silent.start_as_current_span("x") as span:
        assert not span.is_recording()
        assert span.get_span_context().is_valid  # a trace id all the same
    assert nothing.get_finished_spans() == ()
