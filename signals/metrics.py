"""The transmitter's delivery series, per receiver (`webhook:<id>`), in the registry its
intake worker serves: deliveries by outcome, the time from an event's recording to its
delivery, and (refreshed from PostgreSQL at each scrape) what is pending and how old the
oldest pending delivery is."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from signals.store import Backlog

# delivered: a 2xx; retried: a network error, a timeout, 429 or 5xx (due again later);
# failed: any other answer, never retried.
OUTCOMES = ("delivered", "retried", "failed")


class SignalsMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.deliveries = Counter(
            "signals_deliveries",
            "Delivery attempts to receivers, by outcome",
            ["receiver", "outcome"],
            registry=registry,
        )
        self.latency = Histogram(
            "signals_delivery_seconds",
            "Time from an event's recording by the transmitter to its delivery",
            ["receiver"],
            registry=registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600),
        )
        self.pending = Gauge(
            "signals_pending_deliveries",
            "Deliveries not yet made (nor failed for good)",
            ["receiver"],
            registry=registry,
        )
        self.oldest = Gauge(
            "signals_oldest_pending_seconds",
            "Age of the oldest delivery not yet made (0 when none)",
            ["receiver"],
            registry=registry,
        )
        self._receivers: set[str] = set()

    def attempted(self, receiver: str, outcome: str, seconds: float | None = None) -> None:
        self.deliveries.labels(receiver, outcome).inc()
        if seconds is not None:
            self.latency.labels(receiver).observe(seconds)

    def backlog(self, rows: Sequence[Backlog]) -> None:
        """Every receiver's series from start (a counter that appears with its first
        increment hides it from rate()); a removed receiver's series go."""
        seen = {row.receiver for row in rows}
        for row in rows:
            self.pending.labels(row.receiver).set(row.pending)
            self.oldest.labels(row.receiver).set(row.oldest_seconds)
            if row.receiver not in self._receivers:
                for outcome in OUTCOMES:
                    self.deliveries.labels(row.receiver, outcome)
                self.latency.labels(row.receiver)
        for gone in self._receivers - seen:
            for series in (self.pending, self.oldest, self.latency):
                series.remove(gone)
            for outcome in OUTCOMES:
                self.deliveries.remove(gone, outcome)
        self._receivers = seen
