"""The alert rules in deploy/: valid for Prometheus, the same in the plain rules file and
the PrometheusRule, and every alert proven by a `promtool test rules` case that fires it."""

from __future__ import annotations

import importlib.util
import subprocess
from typing import Any

import pytest
import yaml

from tests.support.paths import ROOT
from tests.support.prometheus import (
    ALERT_TESTS,
    PROMTOOL,
    RULES,
    needs_promtool,
)
from tests.support.promql import metric_names


def rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(RULES.read_text())["groups"]
    return groups


def alerts() -> dict[str, dict[str, Any]]:
    return {
        rule["alert"]: rule for group in rule_groups() for rule in group["rules"] if "alert" in rule
    }


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=ROOT, capture_output=True, text=True, timeout=180, check=False
    )


@needs_promtool
def test_rules_file_is_valid_for_prometheus() -> None:
    done = promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
@pytest.mark.timeout(180)  # promtool replays days of series for the burn-rate windows
def test_every_alert_passes_its_promtool_unit_tests() -> None:
    done = promtool("test", "rules", str(ALERT_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    cases = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    fired = {
        check["alertname"]
        for case in cases
        for check in case.get("alert_rule_test", [])
        if check.get("exp_alerts")
    }
    untested = alerts().keys() - fired
    assert not untested, f"alerts without a promtool case that fires them: {sorted(untested)}"
    unknown = {c["alertname"] for case in cases for c in case["alert_rule_test"]} - alerts().keys()
    assert not unknown, f"promtool cases for alerts that do not exist: {sorted(unknown)}"


def test_every_alert_has_a_severity_summary_and_description() -> None:
    for name, rule in alerts().items():
        assert rule["labels"]["severity"] in ("page", "ticket"), name
        assert {"summary", "description"} <= rule["annotations"].keys(), name
        assert rule.get("for"), f"{name} fires on a single evaluation"
        assert metric_names(rule["expr"]), name


def test_the_alerts_the_operations_guide_promises_exist() -> None:
    promised = {
        "OutboxBacklogGrowing": {"outbox_backlog"},
        "OutboxOldestEntryOld": {"outbox_oldest_entry_age_seconds"},
        "OutboxRelayPublishFailing": {"outbox_relay_publish_failures_total"},
        "OutboxDeadLetters": {"outbox_dead_lettered_total"},
        "DeadLetterQueueNotEmpty": {"rabbitmq_detailed_queue_messages"},
        "WorkerQueueWithoutConsumer": {
            "rabbitmq_detailed_queue_messages",
            "rabbitmq_detailed_queue_consumers",
        },
        "WorkerLagging": {"rabbitmq_detailed_queue_messages_ready"},
        "SessionCloseServerErrors": {"http_requests_total"},
        "SessionCloseUnavailable": {"http_requests_total"},
        "SessionCloseComponentDown": {"up"},
        "SessionCloseComponentAbsent": {"up"},
        "SessionSweeperLagging": {"sweeper_lag_seconds"},
    }
    for name, names in promised.items():
        assert name in alerts(), name
        assert metric_names(alerts()[name]["expr"]) == names, name


def test_prometheusrule_holds_the_same_rules_as_the_rules_file() -> None:
    spec = importlib.util.spec_from_file_location(
        "prometheusrule", ROOT / "deploy" / "prometheus" / "prometheusrule.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    committed = (ROOT / "deploy" / "k8s" / "prometheusrule.yaml").read_text()
    assert committed == module.to_yaml(), "stale: run `make deploy-generated`"
    assert yaml.safe_load(committed)["spec"]["groups"] == rule_groups()


def test_metric_name_extraction_keeps_names_and_drops_the_rest() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(a_bucket{route="/x", q=~"b|c"}[5m]'
        " offset 1h))) > 1e3 and on (vhost, queue) b_total == bool 0"
        ' or label_replace(c, "dst", "$1", "src", "(.*)") unless sum without (x) (d:rule)'
        " / ignoring (y) group_left (z) e[$__rate_interval]"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c", "d:rule", "e"}
