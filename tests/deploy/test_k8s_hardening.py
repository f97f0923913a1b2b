"""deploy/k8s keeps each pod to what it needs: a NetworkPolicy per component (ingress only
on the ports it serves, egress only to its backends and DNS, and the transmitter's to
receivers over https), no ServiceAccount token mounted, copies spread over zones and
nodes, and no Secret among the resources (an apply would overwrite the real one)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from tests.deploy.test_deploy import Manifest, secret_env
from tests.deploy.test_k8s_validate import RELAY, base, every_object, with_component

# What each component talks to, by the Secret's URL that names it.
BACKENDS = {
    "api": {"REDIS_URL", "AMQP_URL"},
    "relay": {"REDIS_URL", "AMQP_URL"},
    "audit": {"AMQP_URL", "DATABASE_URL"},
    "push-cleanup": {"AMQP_URL", "REDIS_URL"},
    "signals": {"AMQP_URL", "DATABASE_URL"},
}
# Where the transmitter delivers: receivers' https endpoints, anywhere on the internet.
RECEIVERS = {"ports": [{"port": 443, "protocol": "TCP"}]}
MONITORING = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
DNS = [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]


def rendered() -> list[Manifest]:
    """deploy/k8s with the standalone-relay component: every component there is."""
    return with_component(RELAY)


def pods() -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in rendered():
        if doc["kind"] == "Deployment":
            template = doc["spec"]["template"]
            yield template["metadata"]["labels"]["app.kubernetes.io/component"], template


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return set(selector.get("matchLabels", {}).items()) <= set(labels.items())


def test_every_component_has_its_own_network_policy() -> None:
    policies = [doc for doc in rendered() if doc["kind"] == "NetworkPolicy"]
    seen = set()
    for component, template in pods():
        labels = template["metadata"]["labels"]
        (policy,) = (p for p in policies if selects(p["spec"]["podSelector"], labels))
        spec = policy["spec"]
        assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"], component
        served = {
            port["name"] for c in template["spec"]["containers"] for port in c.get("ports", [])
        }
        ingress = spec.get("ingress", [])
        prometheus = {"from": [MONITORING], "ports": [{"port": "metrics", "protocol": "TCP"}]}
        if component == "api":
            # the apps, through any namespace; /metrics on its own port, Prometheus only
            anywhere: list[dict[str, Any]] = [{"namespaceSelector": {}}]
            apps = {"from": anywhere, "ports": [{"port": "http", "protocol": "TCP"}]}
            assert ingress == [apps, prometheus]
        elif component == "signals":
            # receivers are outside the cluster: its one port from anywhere (Prometheus's
            # scrape included, /metrics being there too)
            assert served == {"http"}
            assert ingress == [{"ports": [{"port": "http", "protocol": "TCP"}]}]
        elif served:
            # workers, the standalone relay: Prometheus only, on the metrics port (probes
            # come from the node)
            assert ingress == [prometheus], component
        else:
            assert ingress == [], f"{component} serves nothing and takes no traffic"
        for rule in ingress:
            assert {port["port"] for port in rule["ports"]} <= served, component
        egress = spec["egress"]
        assert all("to" not in rule for rule in egress)  # the backends are outside
        # its backends, on the ports of the Secret's example URLs, and DNS
        backends = {urlsplit(secret_env()[name]).port for name in BACKENDS[component]}
        assert {port["port"] for port in egress[0]["ports"]} == backends, component
        assert all(port["protocol"] == "TCP" for port in egress[0]["ports"]), component
        beyond = [RECEIVERS] if component == "signals" else []
        assert egress[1:] == [*beyond, {"ports": DNS}], component
        seen.add(component)
    assert seen == set(BACKENDS)


def test_no_pod_mounts_a_service_account_token() -> None:
    for where, doc in every_object():
        if doc["kind"] == "Deployment":
            spec = doc["spec"]["template"]["spec"]
            assert spec.get("automountServiceAccountToken") is False, (
                f"{where}: {doc['metadata']['name']}"
            )


def test_copies_spread_over_zones_and_nodes() -> None:
    for component, template in pods():
        constraints = template["spec"]["topologySpreadConstraints"]
        keys = [c["topologyKey"] for c in constraints]
        assert keys == ["topology.kubernetes.io/zone", "kubernetes.io/hostname"], component
        for constraint in constraints:
            assert selects(constraint["labelSelector"], template["metadata"]["labels"])
            assert constraint["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == (
                component
            )
            # best effort: a cluster with one zone still schedules
            assert constraint["whenUnsatisfiable"] == "ScheduleAnyway", component


def test_no_secret_among_the_resources_an_apply_would_overwrite() -> None:
    assert not [doc for doc in base() if doc["kind"] == "Secret"]
    assert not [doc for doc in rendered() if doc["kind"] == "Secret"]
    for _, doc in every_object():
        assert "change-me" not in str(doc), doc["metadata"]["name"]
    # the workloads still read it, by name, and the example names every key they need
    assert set(secret_env()) == {"REDIS_URL", "AMQP_URL", "DATABASE_URL"}
