"""The Grafana dashboard in deploy/grafana: the committed JSON is what the code generates,
and it shows what an operator looks at first. (Its metric names are checked against the
live /metrics in tests/deploy/test_prometheus_live.py.)"""

from __future__ import annotations

import importlib.util
import json
from types import ModuleType
from typing import Any

from tests.support.paths import ROOT
from tests.support.prometheus import DASHBOARD
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
