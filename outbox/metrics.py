"""Prometheus metrics of the relay and the sweeper, in the registry of the process that
runs them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from outbox.sweeper import SweepResult


class OutboxMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.backlog = Gauge(
            "outbox_backlog",
            "session.closed events in the Redis outbox not yet confirmed by RabbitMQ "
            "(read at scrape time).",
            registry=registry,
        )
        # For the alerts and the dashboard (deploy/prometheus, deploy/grafana):
        self.oldest_age = Gauge(
            "outbox_oldest_entry_age_seconds",
            "Age of the oldest outbox entry not yet confirmed by RabbitMQ, 0 when the "
            "outbox is empty (read at scrape time).",
            registry=registry,
        )
        self.published = Counter(
            "outbox_relay_published",
            "Outbox events the broker confirmed.",
            registry=registry,
        )
        self.publish_failures = Counter(
            "outbox_relay_publish_failures",
            "Outbox publishes that failed or timed out (the entry stays and is retried).",
            registry=registry,
        )
        self.dead_lettered = Counter(
            "outbox_dead_lettered",
            "Outbox entries that could never become a valid event, moved to the dead-letter "
            "stream outbox:dead-letters (docs/operations.md).",
            registry=registry,
        )
        self.swept = Counter(
            "sweeper_sessions",
            "Sessions of the expiry index the sweeper handled, by outcome: expired (event "
            "recorded), rescored (sliding expiry), dropped (gone or no expires_at), failed, "
            "invalid (an expires_at that is not a valid Unix time; dropped, no event).",
            ["outcome"],
            registry=registry,
        )
        self.sweeper_lag = Gauge(
            "sweeper_lag_seconds",
            "How far past its expires_at the oldest session still due was after the last "
            "sweep (0 when none is due).",
            registry=registry,
        )
        self._swept_children = {
            o: self.swept.labels(o) for o in ("expired", "rescored", "dropped", "failed", "invalid")
        }

    def relay_published(self, n: int) -> None:
        self.published.inc(n)

    def relay_failed(self, n: int) -> None:
        self.publish_failures.inc(n)

    def relay_dead_lettered(self, n: int) -> None:
        self.dead_lettered.inc(n)

    def sweep(self, result: SweepResult) -> None:
        for outcome, child in self._swept_children.items():
            child.inc(getattr(result, outcome))
        self.sweeper_lag.set(result.lag)
