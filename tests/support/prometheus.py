"""Where promtool and prometheus are (Debian's `prometheus` package, installed by
`make setup` when run as root) and the markers of the tests that need them (skipped
where they are missing, failed under CI=true: tests/support/tools.py)."""

from __future__ import annotations

import shutil

from tests.support.paths import ROOT
from tests.support.tools import needs_tool

RULES = ROOT / "deploy" / "prometheus" / "rules.yaml"
ALERT_TESTS = ROOT / "tests" / "deploy" / "prometheus" / "alerts_test.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "session-close.json"

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")

INSTALL = (
    "install Debian's `prometheus` package "
    "(`make setup` as root does: apt-get install --no-install-recommends prometheus)"
)
needs_promtool = needs_tool("promtool", PROMTOOL, INSTALL)
needs_prometheus = needs_tool("prometheus", PROMTOOL and PROMETHEUS, INSTALL)
