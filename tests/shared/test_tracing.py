"""Traces (session_close/tracing.py), exported by the real processes to a real OTLP/HTTP
receiver that this test starts and that decodes the protobuf: one close with the
caller's traceparent is one trace across the API, its relay and both workers; the lines
logged inside a span carry its ids; with no endpoint nothing is exported."""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from opentelemetry import trace
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from redis.asyncio import Redis

from session_close import tracing
from session_close.keys import Keys
from session_close.settings import Settings
from tests.support.closing import BODY, CLOSE_PATH, app_headers, open_session
from tests.support.otlp import Receiver
from tests.support.processes import listening_port, log_tail, running, settings_env
from tests.support.waiting import wait_until
from tests.support.workers import AuditTable, WorkerProcess

USER, SID, TOKEN = "user-traced", "session-traced-0001", "token-of-user-traced"
CLOSE_ROUTE = "POST /v1.0/session/close"


def caller_traceparent() -> tuple[str, str, str]:
    """A sampled W3C traceparent of a caller, its trace id and its span id."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


# The spans one close makes: (service.name, span name), the workers' on their own.
EXPECTED = [
    ("session-close-api", CLOSE_ROUTE),
    ("session-close-api", "redis close_sessions"),
    ("session-close-api", "publish session.closed"),
    ("session-close-audit", "audit handle"),
    ("session-close-audit", "audit effect"),
    ("session-close-push-cleanup", "push-cleanup handle"),
    ("session-close-push-cleanup", "push-cleanup effect"),
]


@dataclass
class TracedClose:
    trace_id: str
    caller_span_id: str
    api_lines: list[dict[str, Any]]
    audit: WorkerProcess


async def traced_close(
    settings: Settings,
    redis: Redis,
    keys: Keys,
    receiver: Receiver,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    worker_processes: list[WorkerProcess],
) -> TracedClose:
    """Both workers and the API (with its relay and sweeper) exporting to `receiver`;
    one close with a caller's traceparent, answered, audited and its spans received."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    for name in ("audit", "push-cleanup"):
        worker = await WorkerProcess.start(settings, name)
        worker_processes.append(worker)
        await worker.wait_logged("consuming", timeout=30)
    await open_session(redis, keys, USER, SID, TOKEN)
    header, trace_id, caller_span_id = caller_traceparent()
    log = tmp_path / "api.log"
    env = settings_env(settings, HTTP_HOST="127.0.0.1", HTTP_PORT="0", LOG_LEVEL="INFO")
    with running(["service"], env, log) as proc:
        port = listening_port(log, proc)
        async with (
            aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http,
            http.post(
                CLOSE_PATH, headers=app_headers(TOKEN, SID, traceparent=header), data=BODY
            ) as resp,
        ):
            assert resp.status == 200, await resp.text()

        def received() -> bool:
            return all(receiver.named(service, name) for service, name in EXPECTED)

        await wait_until(received, f"the spans {EXPECTED}", within=30)
        proc.send_signal(signal.SIGTERM)
        # Off the loop: the exit flushes spans to the receiver, which runs on it.
        assert await asyncio.to_thread(proc.wait, 15) == 0, log_tail(log)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return TracedClose(trace_id, caller_span_id, lines, worker_processes[0])


async def test_one_close_is_one_trace_across_the_api_the_relay_and_both_workers(
    settings: Settings,
    redis: Redis,
    keys: Keys,
    amqp_cleanup: None,
    audit_table: AuditTable,
    receiver: Receiver,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    worker_processes: list[WorkerProcess],
) -> None:
    close = await traced_close(
        settings, redis, keys, receiver, tmp_path, monkeypatch, worker_processes
    )
    spans = {(service, name): receiver.named(service, name) for service, name in EXPECTED}
    assert {key: len(found) for key, found in spans.items()} == dict.fromkeys(EXPECTED, 1)
    one = {key: found[0] for key, found in spans.items()}
    assert {key: s.trace_id for key, s in one.items()} == dict.fromkeys(EXPECTED, close.trace_id)

    server = one["session-close-api", CLOSE_ROUTE]
    assert server.span.kind == Span.SPAN_KIND_SERVER
    assert server.parent_id == close.caller_span_id  # the caller's span continues
    parents = {
        ("session-close-api", "redis close_sessions"): server,
        ("session-close-api", "publish session.closed"): server,
        ("session-close-audit", "audit handle"): server,
        ("session-close-audit", "audit effect"): one["session-close-audit", "audit handle"],
        ("session-close-push-cleanup", "push-cleanup handle"): server,
        ("session-close-push-cleanup", "push-cleanup effect"): one[
            "session-close-push-cleanup", "push-cleanup handle"
        ],
    }
    assert {key: one[key].parent_id for key in parents} == {
        key: parent.span_id for key, parent in parents.items()
    }
    kinds = {key: one[key].span.kind for key in parents}
    assert kinds == {
        ("session-close-api", "redis close_sessions"): Span.SPAN_KIND_CLIENT,
        ("session-close-api", "publish session.closed"): Span.SPAN_KIND_PRODUCER,
        ("session-close-audit", "audit handle"): Span.SPAN_KIND_CONSUMER,
        ("session-close-audit", "audit effect"): Span.SPAN_KIND_INTERNAL,
        ("session-close-push-cleanup", "push-cleanup handle"): Span.SPAN_KIND_CONSUMER,
        ("session-close-push-cleanup", "push-cleanup effect"): Span.SPAN_KIND_INTERNAL,
    }


async def test_the_access_line_and_a_worker_line_carry_the_trace_and_span_ids(
    settings: Settings,
    redis: Redis,
    keys: Keys,
    amqp_cleanup: None,
    audit_table: AuditTable,
    receiver: Receiver,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    worker_processes: list[WorkerProcess],
) -> None:
    close = await traced_close(
        settings, redis, keys, receiver, tmp_path, monkeypatch, worker_processes
    )
    server = receiver.named("session-close-api", CLOSE_ROUTE)[0]
    handle = receiver.named("session-close-audit", "audit handle")[0]
    access = [line for line in close.api_lines if line.get("path") == CLOSE_PATH]
    assert [(line.get("trace_id"), line.get("span_id")) for line in access] == [
        (close.trace_id, server.span_id)
    ]
    await close.audit.wait_logged("session close audited")
    audited = close.audit.logged("session close audited")
    assert [(line.get("trace_id"), line.get("span_id")) for line in audited] == [
        (close.trace_id, handle.span_id)
    ]


async def test_with_no_endpoint_nothing_is_exported_and_no_exporter_thread_runs(
    settings: Settings,
    redis: Redis,
    keys: Keys,
    amqp_cleanup: None,
    receiver: Receiver,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    # Everything else set, the receiver's address included where an endpoint is not read.
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "session-close-untraced")

    # In this process: no provider, no exporter thread, the API's no-op tracer.
    assert tracing.configure("session-close-api") is False
    assert tracing.ENABLED is False
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    assert not [t.name for t in threading.enumerate() if "Otel" in t.name]
    assert not trace.get_tracer(__name__).start_span("x").get_span_context().is_valid

    # The API as a process: a traced close, then a clean exit (which would flush any
    # provider), and the receiver never called; the access line has no trace ids.
    await open_session(redis, keys, USER, SID, TOKEN)
    header, _, _ = caller_traceparent()
    log = tmp_path / "api.log"
    env = settings_env(settings, HTTP_HOST="127.0.0.1", HTTP_PORT="0", LOG_LEVEL="INFO")
    with running(["service"], env, log) as proc:
        port = listening_port(log, proc)
        async with (
            aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http,
            http.post(
                CLOSE_PATH, headers=app_headers(TOKEN, SID, traceparent=header), data=BODY
            ) as resp,
        ):
            assert resp.status == 200, await resp.text()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 15) == 0, log_tail(log)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    access = [line for line in lines if line.get("path") == CLOSE_PATH]
    assert [sorted(line.keys() & {"trace_id", "span_id"}) for line in access] == [[]]
    assert not [line for line in lines if line.get("event") == "tracing on"]
    assert receiver.requests == 0


@pytest.mark.parametrize(
    ("otel_service_name", "reported"),
    [(None, "session-close-relay"), ("checkout-relay", "checkout-relay")],
)
def test_a_process_reports_its_own_service_name_unless_otel_service_name_says_otherwise(
    otel_service_name: str | None, reported: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The endpoint is never called: nothing is traced, and the provider is not shut down.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    if otel_service_name is None:
        monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    else:
        monkeypatch.setenv("OTEL_SERVICE_NAME", otel_service_name)
    script = (
        "from opentelemetry import trace\n"
        "from session_close import tracing\n"
        "assert tracing.configure('session-close-relay')\n"
        "print(trace.get_tracer_provider().resource.attributes['service.name'])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert (done.returncode, done.stdout.splitlines()[-1:]) == (0, [reported]), done.stderr
