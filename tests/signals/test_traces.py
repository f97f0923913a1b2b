"""The transmitter's spans, exported to a real OTLP/HTTP receiver: an event's handling
and each delivery attempt join the trace of the close that made the event (its
traceparent), so one logout is one trace as far as the receiver."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Awaitable, Callable

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from session_close.settings import Settings
from tests.signals.conftest import Receiver, Transmitter, register
from tests.support.otlp import Receiver as OtlpReceiver
from tests.support.waiting import wait_until
from tests.support.workers import Broker, make_event

SERVICE = "session-close-signals"


async def test_an_events_handling_and_delivery_are_spans_of_the_closes_trace(
    settings: Settings,
    receivers: Callable[..., Awaitable[Receiver]],
    transmitters: list[Transmitter],
    signals_queue: Broker,
    receiver: OtlpReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    hook = await receivers()
    await register(settings, hook)
    transmitters.append(await Transmitter.start(settings))
    trace_id, close_span = secrets.token_hex(16), secrets.token_hex(8)
    event = dataclasses.replace(make_event(1), traceparent=f"00-{trace_id}-{close_span}-01")
    await signals_queue.publish(event)

    def exported() -> bool:
        names = {s.span.name for s in receiver.spans if s.service == SERVICE}
        return {"signals handle", "signals effect", "signals deliver"} <= names

    await wait_until(exported, "the transmitter's spans exported")
    [handle] = receiver.named(SERVICE, "signals handle")
    [effect] = receiver.named(SERVICE, "signals effect")
    [deliver] = receiver.named(SERVICE, "signals deliver")
    assert {s.trace_id for s in (handle, effect, deliver)} == {trace_id}
    assert handle.parent_id == deliver.parent_id == close_span
    assert effect.parent_id == handle.span_id
    assert deliver.span.kind == Span.SPAN_KIND_CLIENT
    assert hook.accepted() == [event.event_id]
    [delivered] = [line for line in transmitters[0].lines if line["event"] == "signal delivered"]
    assert (delivered["trace_id"], delivered["span_id"]) == (trace_id, deliver.span_id)
