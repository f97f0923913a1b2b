"""The Grafana dashboard in deploy/grafana: the committed JSON is what the code generates,
and it shows what an operator looks at first. (Its metric names are checked against the
live /metrics in tests/deploy/test_prometheus_live.py.)"""

from __future__ import annotations

import importlib.util
import json
import re
from types import ModuleType
from typing import Any

import yaml

from tests.support.paths import ROOT
from tests.support.prometheus import DASHBOARD, RULES
from tests.support.promql import metric_names


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "dashboard", ROOT / "deploy" / "grafana" / "dashboard.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def panels() -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = json.loads(DASHBOARD.read_text())["panels"]
    return [p for p in found if p["type"] != "row"]


def test_committed_dashboard_is_what_the_code_generates() -> None:
    assert DASHBOARD.read_text() == generator().to_json(), "stale: run `make deploy-generated`"


def test_dashboard_shows_what_operators_need() -> None:
    shown = {
        p["title"]: set().union(*(metric_names(t["expr"]) for t in p["targets"])) for p in panels()
    }
    needed = {
        "Requests by status": {"http_requests_total"},
        "Close latency percentiles": {"http_request_duration_seconds_bucket"},
        "Closes by outcome": {"session_closes_total"},
        "Outbox backlog": {"outbox_backlog"},
        "Relay publishes": {"outbox_relay_published_total", "outbox_relay_publish_failures_total"},
        "Messages settled per worker": {"worker_messages_total"},
        "Retries and dead letters": {"worker_retries_total", "worker_messages_total"},
        "Resident memory": {"process_resident_memory_bytes"},
        "CPU": {"process_cpu_seconds_total"},
    }
    for title, names in needed.items():
        assert title in shown, f"no panel {title!r}"
        assert names <= shown[title], f"{title}: {shown[title]}"


def test_every_panel_queries_the_chosen_prometheus() -> None:
    for panel in panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert [t["refId"] for t in panel["targets"]] == list("ABCDEFGH"[: len(panel["targets"])])


def dashboard_json() -> dict[str, Any]:
    found: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return found


def test_namespace_and_job_variables_pick_one_install_and_its_components() -> None:
    variables = {v["name"]: v for v in dashboard_json()["templating"]["list"]}
    jobs = 'job=~"session-close-(api|relay|audit|push-cleanup|signals)"'
    namespace, job = variables["namespace"], variables["job"]
    assert namespace["type"] == job["type"] == "query"
    assert namespace["query"] == f"label_values(up{{{jobs}}}, namespace)"
    assert job["query"] == f'label_values(up{{namespace="$namespace", {jobs}}}, job)'
    # "All" is every component, as the alert rules select them
    assert job["multi"] is True
    assert job["includeAll"] is True
    assert f'job=~"{job["allValue"]}"' == jobs
    # this service's series, in every panel: the chosen namespace and jobs
    for panel in panels():
        for target in panel["targets"]:
            for name in metric_names(target["expr"]):
                if name.startswith("rabbitmq_"):
                    continue  # the broker's own job: its queues are selected by name
                found = re.findall(rf"{re.escape(name)}\{{([^}}]*)\}}", target["expr"])
                assert found, f"{panel['title']}: {name} without selector"
                for matchers in found:
                    assert 'namespace="$namespace"' in matchers, panel["title"]
                    assert 'job=~"$job"' in matchers, panel["title"]


def test_the_slo_row_comes_first_and_reads_the_recording_rules() -> None:
    every = dashboard_json()["panels"]
    assert every[0]["type"] == "row"
    assert every[0]["title"] == "SLOs"
    rows = [i for i, p in enumerate(every) if p["type"] == "row"]
    slo_panels = every[1 : rows[1]]
    recorded = {
        rule["record"]
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
        if "record" in rule
    }
    read = set().union(*(metric_names(t["expr"]) for p in slo_panels for t in p["targets"]))
    assert read <= recorded
    # both SLIs, over a short and the longest window, as share and as burn rate
    for sli in ("close_errors", "close_slow"):
        assert {f"session_close:{sli}:ratio_rate5m", f"session_close:{sli}:ratio_rate3d"} <= read
    burn = [p for p in slo_panels if "burn rate" in p["title"]]
    assert len(burn) == 2
    for panel in burn:
        assert all(re.search(r" / 0\.0?01$", t["expr"]) for t in panel["targets"])
