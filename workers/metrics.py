"""Prometheus metrics of one worker process and its liveness, on their own port when
asked for: `/healthz` answers 503 once the event loop's heartbeat is older than
`stale_after` seconds, so a loop that is stuck (while this server's thread still answers)
fails the liveness probe; every other path serves the metrics.

Each Worker gets its own CollectorRegistry, so two workers in one process (as in the
tests) never share counters, and nothing lives in module globals.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import orjson
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
    make_wsgi_app,
)

from session_close import __version__

log = logging.getLogger(__name__)

# acked: effect done; dead_lettered: malformed or poison; requeued: handed back to the
# broker (shutdown, or a settle lost with the connection); retried: acked after >= 1 retry.
OUTCOMES = ("acked", "dead_lettered", "requeued", "retried")
DEAD_LETTER_REASONS = ("malformed", "poison")
# The worker's loop beats every HEARTBEAT_SECONDS; the deploy/ probes allow for this bound.
HEARTBEAT_SECONDS = 5.0
STALE_AFTER_SECONDS = 20.0


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes every few seconds: no access log."""


class WorkerMetrics:
    def __init__(self, worker: str, *, stale_after: float = STALE_AFTER_SECONDS) -> None:
        self.worker = worker
        self.stale_after = stale_after
        self._last_beat = time.monotonic()
        # No `_created` series (the switch is prometheus_client's, for the process).
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        self.messages = Counter(
            "worker_messages",
            "Session event messages (session.closed, session.expired) settled, by outcome",
            ["worker", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "worker_processing_seconds",
            "Time from delivery to ack, reject or requeue",
            ["worker"],
            registry=self.registry,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.retries = Counter(
            "worker_retries",
            "Attempts retried after a failure (backend unreachable, or the message's own)",
            ["worker"],
            registry=self.registry,
        )
        self.dead_letters = Counter(
            "worker_dead_letters",
            "Messages dead-lettered: malformed at once, poison after WORKER_MAX_ATTEMPTS",
            ["worker", "reason"],
            registry=self.registry,
        )
        self.ack_frames = Counter(
            "worker_ack_frames",
            "basic.ack frames sent; one acks a run of messages",
            ["worker"],
            registry=self.registry,
        )
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, memory
        # build_info{version="..."} 1: which release each process runs.
        Info("build", "The running release.", registry=self.registry).info({"version": __version__})
        # Every series exists from start: one that appears with its first increment
        # hides that increment from rate() and leaves the alerts without data.
        # The children of the per-message series, looked up once: labels() takes a lock.
        self._outcomes = {outcome: self.messages.labels(worker, outcome) for outcome in OUTCOMES}
        self._latency = self.latency.labels(worker)
        for reason in DEAD_LETTER_REASONS:
            self.dead_letters.labels(worker, reason)
        for labelled in (self.latency, self.retries, self.ack_frames):
            labelled.labels(worker)
        # prometheus_client's WSGI app: text or OpenMetrics as asked, gzip when accepted.
        self._metrics_app = make_wsgi_app(self.registry)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        """Called from the worker's event loop: it is alive."""
        self._last_beat = time.monotonic()

    def heartbeat_age(self) -> float:
        return time.monotonic() - self._last_beat

    def dead_lettered(self, reason: str) -> None:
        self.dead_letters.labels(self.worker, reason).inc()

    def ack_frame(self) -> None:
        self.ack_frames.labels(self.worker).inc()

    def settled(self, outcome: str, durations: Sequence[float]) -> None:
        """Messages settled with one outcome, each with its time from delivery."""
        self._outcomes[outcome].inc(len(durations))
        for seconds in durations:
            self._latency.observe(seconds)

    def retried(self) -> None:
        self.retries.labels(self.worker).inc()

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Serve /healthz and /metrics on `port` (0: any free port); returns the port bound."""
        self._server = make_server(host, port, self._app, _Server, _QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        bound = int(self._server.server_address[1])
        log.info("worker metrics serving", extra={"port": bound})
        return bound

    def _app(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/healthz":
            return self._metrics_app(environ, start_response)  # type: ignore[no-any-return]
        age = self.heartbeat_age()
        alive = age <= self.stale_after
        start_response(
            "200 OK" if alive else "503 Service Unavailable",
            [("Content-Type", "application/json")],
        )
        return [orjson.dumps({"alive": alive, "heartbeatAgeSeconds": round(age, 3)})]

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
