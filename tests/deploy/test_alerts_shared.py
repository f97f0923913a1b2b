"""The rules in deploy/prometheus/rules.yaml run as they are in a Prometheus shared with
other services: each selector names this service's jobs, each aggregation keeps
`namespace`, the SLIs count only the two session routes, the burn-rate alerts are the SRE
workbook's four pairs for both SLOs, every component that vanishes alerts, and every
alert's runbook_url leads to a heading of docs/operations.md."""

from __future__ import annotations

import re
from typing import Any

import yaml

from session_close.settings import Settings
from session_close.topology import TRANSMITTER as SIGNALS_WORKER
from session_close.topology import WORKERS, Topology
from tests.contract.test_docs import anchors
from tests.support.paths import ROOT
from tests.support.prometheus import RULES
from tests.support.promql import metric_names

# The jobs the PodMonitor (deploy/k8s/podmonitor.yaml) gives: session-close-<component>.
JOBS = 'job=~"session-close-(api|relay|audit|push-cleanup|signals)"'
JOB_PATTERN = re.compile(r"session-close-(api|relay|audit|push-cleanup|signals)")
# Series of RabbitMQ's own job (its rabbitmq_prometheus plugin): selected by queue name.
BROKER_PREFIX = "rabbitmq_"
SESSION_ROUTES = ("/v1.0/session/close", "/v1.0/session/close-all")
WINDOWS = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")
# name suffix -> (burn rate, long window, short window, severity)
BURN_RATES = {
    "1h": ("14.4", "1h", "5m", "page"),
    "6h": ("6", "6h", "30m", "page"),
    "1d": ("3", "1d", "2h", "ticket"),
    "3d": ("1", "3d", "6h", "ticket"),
}
SLOS = {"Availability": ("close_errors", "0.001"), "Latency": ("close_slow", "0.01")}
_AGGREGATION = re.compile(
    r"\b(sum|min|max|avg|count|group|stddev|stdvar|topk|bottomk|quantile|count_values)\s*"
    r"(?:(by|without)\s*\(([^()]*)\))?\s*\("
)


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def alerts() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for rule in rules() if "alert" in rule}


def recorded() -> dict[str, str]:
    return {rule["record"]: rule["expr"] for rule in rules() if "record" in rule}


def selectors(expr: str, name: str) -> list[str]:
    """The label matchers of each place `expr` reads `name` ("" when it has none)."""
    found = re.finditer(rf"(?<![\w:]){re.escape(name)}(?![\w:])(\s*\{{[^{{}}]*\}})?", expr)
    return [match.group(1) or "" for match in found]


def test_every_selector_names_this_services_jobs() -> None:
    for rule in rules():
        where = rule.get("alert") or rule["record"]
        for name in metric_names(rule["expr"]) - recorded().keys():
            if name.startswith(BROKER_PREFIX):
                continue
            for matchers in selectors(rule["expr"], name):
                one_job = re.search(r'job="([^"]+)"', matchers)
                assert JOBS in matchers or (one_job and JOB_PATTERN.fullmatch(one_job[1])), (
                    f"{where}: {name}{matchers} does not select this service's jobs"
                )


def test_every_aggregation_keeps_namespace() -> None:
    for rule in rules():
        where = rule.get("alert") or rule["record"]
        for match in _AGGREGATION.finditer(rule["expr"]):
            _, clause, labels = match.groups()
            kept = {label.strip() for label in (labels or "").split(",")}
            dropped = f"{where}: `{match.group(0)}` drops namespace: use `by (namespace, ...)`"
            assert clause == "by", dropped
            assert "namespace" in kept, dropped


def test_the_slis_count_the_session_routes_and_nothing_else() -> None:
    records = recorded()
    for sli in ("close_errors", "close_slow"):
        for window in WINDOWS:
            expr = records[f"session_close:{sli}:ratio_rate{window}"]
            assert f"[{window}]" in expr
            routes = set(re.findall(r'route=~"([^"]+)"', expr))
            assert len(routes) == 1, f"{sli} {window}: {routes}"
            # PromQL's double-quoted strings escape the regex's backslash
            pattern = re.compile(routes.pop().replace("\\\\", "\\"))
            assert all(pattern.fullmatch(route) for route in SESSION_ROUTES)
            for other in ("/healthz", "/readyz", "/metrics", "/openapi.json", "unmatched"):
                assert not pattern.fullmatch(other), f"{sli} {window} counts {other}"
            assert len(re.findall(r"route=~", expr)) == 2, f"{sli} {window}: both sides"
    # availability: every 5xx fails, 503 included; latency: the 250 ms bucket
    assert 'status=~"5.."' in records["session_close:close_errors:ratio_rate5m"]
    assert "503" not in records["session_close:close_errors:ratio_rate5m"]
    assert 'le="0.25"' in records["session_close:close_slow:ratio_rate5m"]


def test_each_slo_has_the_four_multiwindow_burn_rate_alerts() -> None:
    for slo, (sli, budget) in SLOS.items():
        for suffix, (rate, long, short, severity) in BURN_RATES.items():
            name = f"SessionClose{slo}Burn{suffix}"
            rule = alerts()[name]
            expr = " ".join(rule["expr"].split())
            assert expr == (
                f"session_close:{sli}:ratio_rate{long} > ({rate} * {budget}) and "
                f"session_close:{sli}:ratio_rate{short} > ({rate} * {budget})"
            ), name
            assert rule["labels"]["severity"] == severity, name


def test_every_component_that_vanishes_alerts() -> None:
    absent = alerts()["SessionCloseComponentAbsent"]["expr"]
    down = alerts()["SessionCloseComponentDown"]["expr"]
    # every Deployment of deploy/k8s (the relay's component is optional: see rules.yaml)
    components = {
        doc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
        for path in (ROOT / "deploy" / "k8s").glob("*.yaml")
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc["kind"] == "Deployment"
    }
    assert components == {"api", "audit", "push-cleanup", "signals"}
    for component in components:
        assert f'absent(up{{job="session-close-{component}"}})' in absent, component
        assert JOB_PATTERN.fullmatch(f"session-close-{component}"), component
    assert JOB_PATTERN.fullmatch("session-close-relay")
    assert JOBS in down
    assert down.endswith("== 0")


def test_the_queue_rules_select_every_consumers_queue() -> None:
    """The broker's series are selected by queue name (AMQP_QUEUE_PREFIX's default): each
    rule on the worker queues selects every worker's and the transmitter's, and each rule
    on the dead-letter queues every one of theirs."""
    topology = Topology.from_settings(Settings())
    consumers = (*WORKERS, SIGNALS_WORKER)
    queues = {topology.queue(name) for name in consumers}
    dead_letters = {topology.dead_letter_queue(name) for name in consumers}
    seen = 0
    for name, rule in alerts().items():
        for pattern in re.findall(r'queue=~"([^"]+)"', rule["expr"]):
            # PromQL's double-quoted strings escape the regex's backslash
            regex = re.compile(pattern.replace("\\\\", "\\"))
            selected = {q for q in queues | dead_letters if regex.fullmatch(q)}
            assert selected in (queues, dead_letters), f"{name}: {pattern} selects {selected}"
            seen += 1
    assert seen >= 4


def test_every_alert_has_a_runbook_url_to_a_heading_of_the_operations_guide() -> None:
    headings = anchors((ROOT / "docs" / "operations.md").read_text())
    for name, rule in alerts().items():
        url = rule["annotations"].get("runbook_url", "")
        path, _, anchor = url.partition("#")
        assert path == "docs/operations.md", f"{name}: runbook_url {url!r}"
        assert anchor in headings, f"{name}: no heading #{anchor} in docs/operations.md"
