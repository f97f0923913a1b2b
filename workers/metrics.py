"""Prometheus metrics of one worker process, on their own port when asked for.

Each Worker gets its own CollectorRegistry, so two workers in one process (as in the
tests) never share counters, and nothing lives in module globals.
"""

from __future__ import annotations

import logging
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    start_http_server,
)

log = logging.getLogger(__name__)

# acked: effect done; dead_lettered: malformed; requeued: handed back to the broker
# (shutdown, or an ack lost with the connection); retried: settled after >= 1 retry.
OUTCOMES = ("acked", "dead_lettered", "requeued", "retried")


class WorkerMetrics:
    def __init__(self, worker: str) -> None:
        self.worker = worker
        self.registry = CollectorRegistry()
        self.messages = Counter(
            "worker_messages",
            "session.closed messages settled, by outcome",
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
            "Attempts retried after a failure (backend unreachable)",
            ["worker"],
            registry=self.registry,
        )
        for outcome in OUTCOMES:
            self.messages.labels(worker, outcome)
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, memory
        self._server: WSGIServer | None = None

    def settled(self, outcome: str, seconds: float) -> None:
        self.messages.labels(self.worker, outcome).inc()
        self.latency.labels(self.worker).observe(seconds)

    def retried(self) -> None:
        self.retries.labels(self.worker).inc()

    def count(self, outcome: str) -> float:
        return (
            self.registry.get_sample_value(
                "worker_messages_total", {"worker": self.worker, "outcome": outcome}
            )
            or 0.0
        )

    def retry_count(self) -> float:
        return (
            self.registry.get_sample_value("worker_retries_total", {"worker": self.worker}) or 0.0
        )

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Expose /metrics on `port` (0: any free port); returns the port bound."""
        self._server, _ = start_http_server(port, host, registry=self.registry)
        bound = int(self._server.server_address[1])
        log.info("worker metrics on port %d", bound)
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
