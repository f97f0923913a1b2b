"""The session close service's Grafana dashboard, as code (grafana-foundation-sdk).

`make deploy-generated` writes deploy/grafana/session-close.json from this module; a test
regenerates it and fails when the committed JSON differs. Every metric name a panel
queries is checked against the live /metrics of the API and the workers
(tests/deploy/test_prometheus_live.py).

For a Prometheus shared with other services: the `namespace` and `job` variables pick one
install and its components (the jobs the PodMonitor gives, session-close-<component>),
and every query of this service's series selects them. The SLO row reads the recording
rules of deploy/prometheus/rules.yaml.
"""

from __future__ import annotations

import sys

from grafana_foundation_sdk.builders import dashboard, prometheus, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import Dashboard as DashboardModel
from grafana_foundation_sdk.models.dashboard import (
    DataSourceRef,
    VariableOption,
    VariableRefresh,
)

UID = "eliab-session-close"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"
# Every component's job, as deploy/prometheus/rules.yaml selects them.
JOBS = "session-close-(api|relay|audit|push-cleanup|signals)"
# This service's series in the chosen namespace and jobs.
OURS = 'namespace="$namespace", job=~"$job"'
CLOSE_ROUTE = f'{OURS}, route="/v1.0/session/close"'
# The SLOs of rules.yaml: the share of closes allowed to fail, and to take over 250 ms.
SLOS = (("Availability", "close_errors", 0.001), ("Latency", "close_slow", 0.01))
DLQ = 'queue=~"sessions\\\\.(audit|push-cleanup|signals)\\\\.dlq"'


def query(expr: str, legend: str) -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).datasource(DATASOURCE)


def panel(title: str, unit: str, *queries: prometheus.Dataquery) -> timeseries.Panel:
    built = timeseries.Panel().title(title).unit(unit).datasource(DATASOURCE).height(8).span(8)
    for ref_id, q in zip("ABCDEFGH", queries, strict=False):
        built = built.with_target(q.ref_id(ref_id))
    return built


def variables() -> list[dashboard.QueryVariable]:
    namespace = (
        dashboard.QueryVariable("namespace")
        .label("Namespace")
        .datasource(DATASOURCE)
        .query(f'label_values(up{{job=~"{JOBS}"}}, namespace)')
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
    )
    job = (
        dashboard.QueryVariable("job")
        .label("Component")
        .datasource(DATASOURCE)
        .query(f'label_values(up{{namespace="$namespace", job=~"{JOBS}"}}, job)')
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .multi(True)
        .include_all(True)
        .all_value(JOBS)
        .current(VariableOption(selected=True, text="All", value="$__all"))
    )
    return [namespace, job]


def slo_panels(title: str, sli: str, budget: float) -> list[timeseries.Panel]:
    """The SLI over the short and long windows, and how fast each burns the budget."""
    ratio = f"session_close:{sli}:ratio_rate"
    return [
        panel(
            f"{title}: share of closes out of the SLO",
            "percentunit",
            *(query(f"{ratio}{window}{{{OURS}}}", window) for window in ("5m", "1h", "1d")),
            query(f"vector({budget})", "budget"),
        ),
        panel(
            f"{title}: error budget burn rate",
            "none",
            *(
                query(f"{ratio}{window}{{{OURS}}} / {budget}", window)
                for window in ("1h", "6h", "1d", "3d")
            ),
        ),
    ]


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
        .with_variable(variables()[0])
        .with_variable(variables()[1])
        .with_row(dashboard.Row("SLOs"))
        .with_panel(slo_panels(*SLOS[0])[0])
        .with_panel(slo_panels(*SLOS[0])[1])
        .with_panel(slo_panels(*SLOS[1])[0])
        .with_panel(slo_panels(*SLOS[1])[1])
        .with_row(dashboard.Row("API"))
        .with_panel(
            panel(
                "Requests by status",
                "reqps",
                query(
                    f"sum by (status) (rate(http_requests_total{{{OURS}}}[{RATE}]))", "{{status}}"
                ),
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
                query(
                    f"sum by (outcome) (rate(session_closes_total{{{OURS}}}[{RATE}]))",
                    "{{outcome}}",
                ),
            )
        )
        .with_row(dashboard.Row("Outbox"))
        .with_panel(
            panel(
                "Outbox backlog",
                "short",
                query(f"max(outbox_backlog{{{OURS}}})", "entries"),
            )
        )
        .with_panel(
            panel(
                "Oldest outbox entry",
                "s",
                query(f"max(outbox_oldest_entry_age_seconds{{{OURS}}})", "age"),
            )
        )
        .with_panel(
            panel(
                "Relay publishes",
                "ops",
                query(f"sum(rate(outbox_relay_published_total{{{OURS}}}[{RATE}]))", "confirmed"),
                query(
                    f"sum(rate(outbox_relay_publish_failures_total{{{OURS}}}[{RATE}]))", "failed"
                ),
            )
        )
        .with_row(dashboard.Row("Workers"))
        .with_panel(
            panel(
                "Messages settled per worker",
                "ops",
                query(
                    f"sum by (worker, outcome) (rate(worker_messages_total{{{OURS}}}[{RATE}]))",
                    "{{worker}} {{outcome}}",
                ),
            )
        )
        .with_panel(
            panel(
                "Retries and dead letters",
                "ops",
                query(
                    f"sum by (worker) (rate(worker_retries_total{{{OURS}}}[{RATE}]))",
                    "{{worker}} retries",
                ),
                query(
                    "sum by (worker) (rate("
                    f'worker_messages_total{{{OURS}, outcome="dead_lettered"}}[{RATE}]))',
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
                    f"(rate(worker_processing_seconds_bucket{{{OURS}}}[{RATE}])))",
                    "{{worker}}",
                ),
            )
        )
        .with_row(dashboard.Row("Processes"))
        .with_panel(
            panel(
                "Resident memory",
                "bytes",
                query(f"process_resident_memory_bytes{{{OURS}}}", "{{job}} {{instance}}"),
            )
        )
        .with_panel(
            panel(
                "CPU",
                "percentunit",
                query(f"rate(process_cpu_seconds_total{{{OURS}}}[{RATE}])", "{{job}} {{instance}}"),
            )
        )
        .build()
    )


def to_json() -> str:
    return JSONEncoder(sort_keys=True, indent=2).encode(build()) + "\n"


if __name__ == "__main__":
    sys.stdout.write(to_json())
