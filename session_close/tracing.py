"""Traces by OpenTelemetry, set up the same way by every process: configured only by the
standard OTEL_* variables (the SDK reads them: OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT,
OTEL_SERVICE_NAME, OTEL_TRACES_SAMPLER, OTEL_BSP_*...), exported by OTLP/HTTP protobuf,
and off when no exporter endpoint is set: then no provider and no exporter thread exist,
`ENABLED` is False, and the traced paths skip building spans altogether (the API's
tracer would be the no-op one anyway).

The spans (docs/operations.md, "Traces"): the API's server span per close and close-all
with a child per Redis step; the relay's producer span per published event; each
worker's consumer span per event with a child for its effect. They join one trace
through the event's CloudEvents `traceparent`, which with tracing on is the close
span's own context."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

__all__ = ["Span", "SpanKind", "StatusCode", "trace"]  # re-exported for the traced paths

# True once configure() installed a provider; read on every traced path.
ENABLED = False

_ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_propagator = TraceContextTextMapPropagator()


def configure(service_name: str) -> bool:
    """Install the SDK's provider with a batching OTLP/HTTP exporter when an exporter
    endpoint is set (and OTEL_SDK_DISABLED is not true); `service_name` is this process's
    unless OTEL_SERVICE_NAME says otherwise. The provider flushes and shuts down at
    process exit (the SDK's atexit hook). Returns whether tracing is on."""
    global ENABLED
    if not any(os.environ.get(name) for name in _ENDPOINTS):
        return False
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    # Imported only when on (redis-py imports some SDK modules itself, building nothing).
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, but the
    # attributes given here win over them: give the name only when none is set.
    own = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
    provider = TracerProvider(resource=Resource.create(own))  # OTEL_TRACES_SAMPLER too
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    ENABLED = True
    log.info("tracing on", extra={"service_name": provider.resource.attributes[SERVICE_NAME]})
    return True


def tracer(name: str) -> Tracer:
    """The module's tracer: the SDK's once configured, the API's no-op one before."""
    return trace.get_tracer(name)


def parent_context(traceparent: str | None) -> Context | None:
    """The context a span continues: the remote span of a W3C traceparent; None (a new
    trace) for none or a malformed one."""
    if not traceparent:
        return None
    context = _propagator.extract({"traceparent": traceparent})
    return context if trace.get_current_span(context).get_span_context().is_valid else None


def traceparent_of(span: Span) -> str:
    """A span's context as a version-00 W3C traceparent."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, trace.set_span_in_context(span))
    return carrier["traceparent"]


def ids_of(span: Span) -> dict[str, str]:
    """The trace_id and span_id fields of a log line written for this span; none for an
    invalid one."""
    context = span.get_span_context()
    if not context.is_valid:
        return {}
    return {
        "trace_id": trace.format_trace_id(context.trace_id),
        "span_id": trace.format_span_id(context.span_id),
    }


def current_ids() -> dict[str, str]:
    """trace_id and span_id of the span current in this context, if any (logs.py)."""
    if not ENABLED:
        return {}
    return ids_of(trace.get_current_span())


# Per event id, the span of a worker's handling of that event, while its batch is in the
# effect: the lines an effect logs per event carry that event's span (a batch has many).
EVENT_SPANS: ContextVar[dict[str, Span] | None] = ContextVar("event_spans", default=None)


@contextmanager
def event_spans(spans: dict[str, Span]) -> Iterator[None]:
    token = EVENT_SPANS.set(spans)
    try:
        yield
    finally:
        EVENT_SPANS.reset(token)
