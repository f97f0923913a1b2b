"""Writes deploy/k8s/prometheusrule.yaml: the groups of deploy/prometheus/rules.yaml in a
PrometheusRule for the Prometheus operator (`make deploy-generated`; a test fails when
the committed file differs)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

RULES = Path(__file__).with_name("rules.yaml")
HEADER = (
    "# Generated from deploy/prometheus/rules.yaml by deploy/prometheus/prometheusrule.py\n"
    "# (make deploy-generated): edit the rules there. Needs the Prometheus operator's CRDs.\n"
)


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def build() -> dict[str, Any]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "session-close"},
        "spec": {"groups": groups},
    }


def to_yaml() -> str:
    return HEADER + yaml.dump(build(), Dumper=_Dumper, sort_keys=False, width=100)


if __name__ == "__main__":
    sys.stdout.write(to_yaml())
