"""The session close service's Grafana dashboard, as code (grafana-foundation-sdk).

`make dashboard` writes deploy/grafana/session-close.json from this module; a test
regenerates it and fails when the committed JSON differs. Every metric name a panel
queries is checked against the live /metrics of the API and the workers
(tests/deploy/test_prometheus_live.py).
"""

from __future__ import annotations

import sys

from grafana_foundation_sdk.builders import dashboard, prometheus, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import Dashboard as DashboardModel
from grafana_foundation_sdk.models.dashboard import DataSourceRef

UID = "eliab-session-close"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"
CLOSE_ROUTE = 'route="/v1.0/session/close"'
DLQ = 'queue=~"sessions\\\\.(audit|push-cleanup)\\\\.dlq"'


def query(expr: str, legend: str) -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).datasource(DATASOURCE)


def panel(title: str, unit: str, *queries: prometheus.Dataquery) -> timeseries.Panel:
    built = timeseries.Panel().title(title).unit(unit).datasource(DATASOURCE).height(8).span(8)
    for ref_id, q in zip("ABCDEFGH", queries, strict=False):
        built = built.with_target(q.ref_id(ref_id))
    return built


def build() -> DashboardModel:
    return (
        dashboard.Dashboard("Session close service")
        .uid(UID)
        .tags(["eliab", "session-close"])
        .refresh("30s")
        .time("now-3h", "now")
        .timezone("browser")
        .with_variable(
            dashboard.DatasourceVariable("datasource").label("Prometheus").type("prometheus")
        )
        .with_row(dashboard.Row("API"))
        .with_panel(
            panel(
                "Requests by status",
                "reqps",
                query(f"sum by (status) (rate(http_requests_total[{RATE}]))", "{{status}}"),
            )
        )
        .with_panel(
            panel(
                "Close latency percentiles",
                "s",
                *(
                    query(
                        f"histogram_quantile({q}, sum by (le) (rate("
                        f"http_request_duration_seconds_bucket{{{CLOSE_ROUTE}}}[{RATE}])))",
                        f"p{round(q * 100)}",
                    )
                    for q in (0.5, 0.9, 0.99)
                ),
            )
        )
        .with_panel(
            panel(
                "Closes by outcome",
                "ops",
                query(f"sum by (outcome) (rate(session_closes_total[{RATE}]))", "{{outcome}}"),
            )
        )
        .with_row(dashboard.Row("Outbox"))
        .with_panel(
            panel(
                "Outbox backlog",
                "short",
                query("max(outbox_backlog)", "entries"),
            )
        )
        .with_panel(
            panel(
                "Oldest outbox entry",
                "s",
                query("max(outbox_oldest_entry_age_seconds)", "age"),
            )
        )
        .with_panel(
            panel(
                "Relay publishes",
                "ops",
                query(f"sum(rate(outbox_relay_published_total[{RATE}]))", "confirmed"),
                query(f"sum(rate(outbox_relay_publish_failures_total[{RATE}]))", "failed"),
            )
        )
        .with_row(dashboard.Row("Workers"))
        .with_panel(
            panel(
                "Messages settled per worker",
                "ops",
                query(
                    f"sum by (worker, outcome) (rate(worker_messages_total[{RATE}]))",
                    "{{worker}} {{outcome}}",
                ),
            )
        )
        .with_panel(
            panel(
                "Retries and dead letters",
                "ops",
                query(
                    f"sum by (worker) (rate(worker_retries_total[{RATE}]))", "{{worker}} retries"
                ),
                query(
                    "sum by (worker) (rate("
                    f'worker_messages_total{{outcome="dead_lettered"}}[{RATE}]))',
                    "{{worker}} dead-lettered",
                ),
                query(
                    f"sum by (queue) (rabbitmq_detailed_queue_messages{{{DLQ}}})",
                    "{{queue}} waiting",
                ),
            )
        )
        .with_panel(
            panel(
                "Processing time p99 per worker",
                "s",
                query(
                    "histogram_quantile(0.99, sum by (worker, le) "
                    f"(rate(worker_processing_seconds_bucket[{RATE}])))",
                    "{{worker}}",
                ),
            )
        )
        .with_row(dashboard.Row("Processes"))
        .with_panel(
            panel(
                "Resident memory",
                "bytes",
                query("process_resident_memory_bytes", "{{job}} {{instance}}"),
            )
        )
        .with_panel(
            panel(
                "CPU",
                "percentunit",
                query(f"rate(process_cpu_seconds_total[{RATE}])", "{{job}} {{instance}}"),
            )
        )
        .build()
    )


def to_json() -> str:
    return JSONEncoder(sort_keys=True, indent=2).encode(build()) + "\n"


if __name__ == "__main__":
    sys.stdout.write(to_json())
