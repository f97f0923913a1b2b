"""Where promtool and prometheus are (Debian's `prometheus` package, installed by
`make setup` when run as root) and the skip when they are not."""

from __future__ import annotations

import shutil

import pytest

from tests.support.paths import ROOT

RULES = ROOT / "deploy" / "prometheus" / "rules.yaml"
ALERT_TESTS = ROOT / "tests" / "deploy" / "prometheus" / "alerts_test.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "session-close.json"

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not installed: install Debian's `prometheus` package "
    "(`make setup` as root does: apt-get install --no-install-recommends prometheus)",
)
needs_prometheus = pytest.mark.skipif(
    PROMTOOL is None or PROMETHEUS is None,
    reason="prometheus/promtool not installed: install Debian's `prometheus` package "
    "(`make setup` as root does: apt-get install --no-install-recommends prometheus)",
)
