"""Prometheus metrics of the API, in a registry of the app's own (tests build many apps
in one process, and a module-global registry would refuse the second set of names).

The request path pays one counter increment and one histogram observation: label
children are looked up once per (route, method, status) and kept.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from service.closer import CloseOutcome

# Closes run in about a millisecond; the tail that matters is Redis timeouts (1 s).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Anything else a client invents is counted as OTHER, so labels stay bounded.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"

_Child = tuple[Counter, Histogram]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "http_requests",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "http_request_duration_seconds",
            "Time from the request reaching the app to its reply, by route template.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.closes = Counter(
            "session_closes",
            "Close requests that reached Redis, by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        self.outbox_backlog = Gauge(
            "outbox_backlog",
            "session.closed events in the Redis outbox not yet confirmed by RabbitMQ "
            "(read at scrape time).",
            registry=self.registry,
        )
        self.redis_up = Gauge(
            "redis_up",
            "1 when Redis answered the last check (/readyz or a scrape).",
            registry=self.registry,
        )
        self.rabbitmq_up = Gauge(
            "rabbitmq_up",
            "1 while the API's RabbitMQ connection is open (read at scrape time). Closes "
            "keep succeeding while it is 0; their events wait in the outbox.",
            registry=self.registry,
        )
        self.relay_published = Counter(
            "outbox_relay_published",
            "Outbox events the broker confirmed.",
            registry=self.registry,
        )
        self.relay_failures = Counter(
            "outbox_relay_publish_failures",
            "Outbox publishes that failed or timed out (the entry stays and is retried).",
            registry=self.registry,
        )
        self._close_children = {o: self.closes.labels(o.value) for o in CloseOutcome}
        self._children: dict[tuple[str, str, int], _Child] = {}
        self._last_backlog = 0

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        if method not in METHODS:
            method = "OTHER"
        key = (route, method, status)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = (
                self.requests.labels(route, method, str(status)),
                self.latency.labels(route, method),
            )
        child[0].inc()
        child[1].observe(seconds)

    def dependencies(self, *, redis_up: bool, rabbitmq_up: bool, backlog: int | None) -> int:
        """Record what a check saw; returns the backlog, or the last one read when Redis
        did not answer."""
        self.redis_up.set(redis_up)
        self.rabbitmq_up.set(rabbitmq_up)
        if backlog is not None:
            self.outbox_backlog.set(backlog)
            self._last_backlog = backlog
        return self._last_backlog

    def close_outcome(self, outcome: CloseOutcome) -> None:
        self._close_children[outcome].inc()

    def relay_published_n(self, n: int) -> None:
        self.relay_published.inc(n)

    def relay_failed_n(self, n: int) -> None:
        self.relay_failures.inc(n)
