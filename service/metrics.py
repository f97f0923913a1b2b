"""Prometheus metrics of the API, in a registry of the app's own (tests build many apps
in one process, and a module-global registry would refuse the second set of names).

The request path pays one counter increment and one histogram observation: label
children are looked up once per (route, method, status) and kept.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
)

from outbox.metrics import OutboxMetrics
from service.closer import CloseAllResult, CloseOutcome
from session_close import __version__

# Closes run in about a millisecond; the tail that matters is Redis timeouts (1 s).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Anything else a client invents is counted as OTHER, so labels stay bounded.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"
# The statuses the alert ratios divide (deploy/prometheus/rules.yaml): their series exist
# from start on the routes the service is for, so that a first 5xx shows in rate().
EXPECTED_STATUSES = (200, 500, 503)

_Child = tuple[Counter, Histogram]


class Metrics:
    def __init__(self) -> None:
        # A `_created` series per counter and histogram doubles what is stored and says
        # nothing an alert uses; the switch is prometheus_client's, for the process.
        disable_created_metrics()  # type: ignore[no-untyped-call]
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
        self.redis_up = Gauge(
            "redis_up",
            "1 when Redis answered the last check (/readyz or a scrape).",
            registry=self.registry,
        )
        self.redis_writes_up = Gauge(
            "redis_writes_up",
            "1 when Redis took the last check's write (/readyz or a scrape); 0 while it "
            "refuses writes (MISCONF: cannot persist; READONLY; NOREPLICAS) or is unreachable.",
            registry=self.registry,
        )
        self.rabbitmq_up = Gauge(
            "rabbitmq_up",
            "1 while the API's RabbitMQ connection is open (read at scrape time). Closes "
            "keep succeeding while it is 0; their events wait in the outbox.",
            registry=self.registry,
        )
        self.close_all_requests = Counter(
            "session_close_all_requests",
            "Close-all (log out everywhere) requests that reached Redis, by outcome: closed "
            "(one or more sessions), nothing (no open session), missing, token.",
            ["outcome"],
            registry=self.registry,
        )
        self.close_all_sessions = Counter(
            "session_close_all_sessions_closed",
            "Sessions closed by close-all requests.",
            registry=self.registry,
        )
        self.outbox = OutboxMetrics(self.registry)
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, memory
        # build_info{version="..."} 1: which release each process runs.
        Info("build", "The running release.", registry=self.registry).info({"version": __version__})
        self._close_children = {o: self.closes.labels(o.value) for o in CloseOutcome}
        for outcome in ("closed", "nothing", "missing", "token"):
            self.close_all_requests.labels(outcome)
        self._children: dict[tuple[str, str, int], _Child] = {}
        self._last_backlog = 0

    def expect_requests(self, route: str, method: str) -> None:
        """Create the route's series (at EXPECTED_STATUSES) before its first request."""
        for status in EXPECTED_STATUSES:
            self._child(route, method, status)

    def observe_request(self, route: str | None, method: str, status: int, seconds: float) -> None:
        """`route` is the route template, None for a request that matched none."""
        if route is None:
            route = UNMATCHED
        if method not in METHODS:
            method = "OTHER"
        requests, latency = self._child(route, method, status)
        requests.inc()
        latency.observe(seconds)

    def _child(self, route: str, method: str, status: int) -> _Child:
        key = (route, method, status)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = (
                self.requests.labels(route, method, str(status)),
                self.latency.labels(route, method),
            )
        return child

    def dependencies(
        self, *, redis_up: bool, redis_writes_up: bool, rabbitmq_up: bool, backlog: int | None
    ) -> int:
        """Record what a check saw; returns the backlog, or the last one read when Redis
        did not answer."""
        self.redis_up.set(redis_up)
        self.redis_writes_up.set(redis_writes_up)
        self.rabbitmq_up.set(rabbitmq_up)
        if backlog is not None:
            self.outbox.backlog.set(backlog)
            self._last_backlog = backlog
        return self._last_backlog

    def close_outcome(self, outcome: CloseOutcome) -> None:
        self._close_children[outcome].inc()

    def close_all_outcome(self, result: CloseAllResult) -> None:
        outcome = result.outcome.value
        if result.outcome is CloseOutcome.CLOSED:
            outcome = "closed" if result.closed else "nothing"
        self.close_all_requests.labels(outcome).inc()
        self.close_all_sessions.inc(result.closed_now)
