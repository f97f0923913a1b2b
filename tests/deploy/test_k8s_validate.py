"""Kubernetes by the book, without a cluster: every object in deploy/k8s (its components
included) validates strictly against its schema (kubernetes-validate for built-in kinds,
tests/deploy/schemas/crds.yaml for KEDA's and the Prometheus operator's), every pod passes Pod
Security "restricted", no Deployment sets the replicas an HPA or KEDA owns, the PodMonitor
scrapes every pod once, on the port that serves its /metrics, and the standalone-relay
component turns the API's relay off and runs `python -m outbox relay` instead."""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, latest_version

from outbox.probes import STALE_AFTER_SECONDS as OUTBOX_STALE_AFTER_SECONDS
from tests.deploy.test_deploy import (
    K8S,
    Manifest,
    assert_entry_point,
    assert_valid_settings,
    cluster_env,
    get_signals_routes,
    probe_port,
)

SCHEMAS = Path(__file__).parent / "schemas" / "crds.yaml"
COMPONENTS = K8S / "components"
RELAY = COMPONENTS / "standalone-relay"
KUBERNETES_VERSION = latest_version()


def load(path: Path) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def base() -> list[Manifest]:
    kustomization = load(K8S / "kustomization.yaml")[0]
    return [doc for name in kustomization["resources"] for doc in load(K8S / name)]


def component(path: Path) -> tuple[list[Manifest], list[tuple[dict[str, Any], Manifest]]]:
    """A kustomize Component's resources and its (target, patch) pairs."""
    (spec,) = load(path / "kustomization.yaml")
    assert spec["kind"] == "Component"
    assert spec["apiVersion"] == "kustomize.config.k8s.io/v1alpha1"
    resources = [doc for name in spec.get("resources", []) for doc in load(path / name)]
    patches = [(p["target"], load(path / p["path"])[0]) for p in spec.get("patches", [])]
    return resources, patches


def merge(into: Any, patch: Any) -> Any:
    """Strategic merge for what the patches here use: maps merge, lists of named items
    merge by name (containers, env), other values replace."""
    if isinstance(into, dict) and isinstance(patch, dict):
        merged = dict(into)
        for key, value in patch.items():
            merged[key] = merge(into[key], value) if key in into else value
        return merged
    if isinstance(into, list) and isinstance(patch, list) and all("name" in i for i in patch):
        merged_list = list(into)
        for item in patch:
            at = [i for i, old in enumerate(merged_list) if old.get("name") == item["name"]]
            if at:
                merged_list[at[0]] = merge(merged_list[at[0]], item)
            else:
                merged_list.append(item)
        return merged_list
    return patch


def with_component(path: Path) -> list[Manifest]:
    """deploy/k8s as `kustomize build` renders it with the component added."""
    resources, patches = component(path)
    out = copy.deepcopy(base())
    for target, patch in patches:
        hits = [
            i
            for i, doc in enumerate(out)
            if doc["kind"] == target["kind"] and doc["metadata"]["name"] == target["name"]
        ]
        assert len(hits) == 1, f"patch target {target} not found exactly once"
        out[hits[0]] = merge(out[hits[0]], patch)
    return out + resources


def every_object() -> Iterator[tuple[str, Manifest]]:
    for doc in base():
        yield "deploy/k8s", doc
    for path in sorted(p for p in COMPONENTS.iterdir() if p.is_dir()):
        for doc in component(path)[0]:
            yield path.name, doc
    for doc in with_component(RELAY):
        if doc["kind"] == "Deployment":
            yield "deploy/k8s + standalone-relay", doc


@functools.cache
def crd_schemas() -> dict[str, Any]:
    schemas: dict[str, Any] = yaml.safe_load(SCHEMAS.read_text())["kinds"]
    return schemas


def validate(doc: Manifest) -> None:
    """Raises when the object does not validate strictly, or when no schema knows it."""
    key = f"{doc['apiVersion']}/{doc['kind']}"
    if key in crd_schemas():
        jsonschema.Draft202012Validator(crd_schemas()[key]).validate(doc)
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def objects_ids() -> list[str]:
    return [f"{where}:{doc['kind']}/{doc['metadata']['name']}" for where, doc in every_object()]


@pytest.mark.parametrize(("where", "doc"), list(every_object()), ids=objects_ids())
def test_object_validates_strictly(where: str, doc: Manifest) -> None:
    try:
        validate(doc)
    except SchemaNotFoundError as exc:
        pytest.fail(f"{where}: no schema for {exc.message}: add it to {SCHEMAS.name}")
    except jsonschema.ValidationError as exc:
        path = ".".join(str(p) for p in exc.absolute_path)
        pytest.fail(f"{where} {doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message}")


def test_strict_validation_rejects_an_unknown_field_builtin_and_custom() -> None:
    kinds = {doc["kind"]: doc for _, doc in every_object()}
    for kind in ("Deployment", "ScaledObject", "PodMonitor", "PrometheusRule"):
        broken = copy.deepcopy(kinds[kind])
        broken["spec"]["replicaz"] = 1
        with pytest.raises(jsonschema.ValidationError):
            validate(broken)
    unknown = {"apiVersion": "example.com/v1", "kind": "Nope", "metadata": {"name": "x"}}
    with pytest.raises(SchemaNotFoundError):
        validate(unknown)


def pod_security_restricted(pod: dict[str, Any]) -> list[str]:
    """What Pod Security Admission's "restricted" level (v1.30) would reject, plus the
    read-only root filesystem this project asks for."""
    problems = []
    pod_ctx = pod.get("securityContext", {})
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(host):
            problems.append(host)
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        allowed = {"configMap", "emptyDir", "projected", "secret", "downwardAPI"}
        allowed |= {"persistentVolumeClaim", "ephemeral", "csi"}
        if not kinds <= allowed:
            problems.append(f"volume {volume['name']}: {kinds}")
    pod_seccomp = pod_ctx.get("seccompProfile", {}).get("type")
    for container in pod.get("initContainers", []) + pod["containers"]:
        ctx = container.get("securityContext", {})
        name = container["name"]
        if ctx.get("privileged"):
            problems.append(f"{name}: privileged")
        if ctx.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation must be false")
        caps = ctx.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            problems.append(f"{name}: capabilities must drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: adds capabilities {caps['add']}")
        if ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is not True:
            problems.append(f"{name}: runAsNonRoot must be true")
        if ctx.get("runAsUser", pod_ctx.get("runAsUser")) == 0:
            problems.append(f"{name}: runAsUser 0")
        seccomp = ctx.get("seccompProfile", {}).get("type", pod_seccomp)
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost")
        if ctx.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: readOnlyRootFilesystem must be true")
        if any(p.get("hostPort") for p in container.get("ports", [])):
            problems.append(f"{name}: hostPort")
    return problems


def deployments() -> Iterator[tuple[str, Manifest]]:
    for where, doc in every_object():
        if doc["kind"] == "Deployment":
            yield where, doc


def test_every_pod_passes_pod_security_restricted() -> None:
    problems = {
        f"{where}: {doc['metadata']['name']}": found
        for where, doc in deployments()
        if (found := pod_security_restricted(doc["spec"]["template"]["spec"]))
    }
    assert not problems
    # the check itself rejects the defaults
    assert len(pod_security_restricted({"containers": [{"name": "c"}]})) == 5


def test_no_replicas_where_an_hpa_or_keda_owns_them() -> None:
    objects = [doc for _, doc in every_object()]
    owned = {
        doc["spec"]["scaleTargetRef"]["name"]
        for doc in objects
        if doc["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")
    }
    assert owned >= {
        "session-close-api",
        "session-close-signals",
        "session-close-audit",
        "session-close-push-cleanup",
    }
    for where, doc in deployments():
        if doc["metadata"]["name"] in owned:
            assert "replicas" not in doc["spec"], f"{where}: {doc['metadata']['name']}"


def relabel(labels: dict[str, str], rules: list[dict[str, Any]]) -> dict[str, str] | None:
    """Prometheus's relabelling, for the actions used here (replace, keep, drop): the
    target's labels after `rules`, or None when they drop it."""
    labels = dict(labels)
    for rule in rules:
        action = rule.get("action", "replace").lower()
        value = rule.get("separator", ";").join(labels.get(n, "") for n in rule["sourceLabels"])
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        if (action == "keep" and not match) or (action == "drop" and match):
            return None
        if action == "replace":
            if match:
                template = re.sub(r"\$\{?(\w+)\}?", r"\\g<\1>", rule.get("replacement", "$1"))
                labels[rule["targetLabel"]] = match.expand(template)
        elif action not in ("keep", "drop"):
            raise AssertionError(f"relabel action {action} is not simulated here")
    return labels


def scrape_targets(monitor: Manifest, doc: Manifest) -> list[tuple[int, str, str]]:
    """(port, path, job) of each target the Prometheus operator makes of a Deployment's
    pod: each endpoint whose port the pod names, kept by its relabelings."""
    template = doc["spec"]["template"]
    labels = template["metadata"]["labels"]
    if not labels.items() >= monitor["spec"]["selector"]["matchLabels"].items():
        return []
    ports = {
        p["name"]: p["containerPort"]
        for c in template["spec"]["containers"]
        for p in c.get("ports", [])
    }
    meta = {
        "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", name): value
        for name, value in labels.items()
    }
    targets = []
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        if endpoint["port"] not in ports:
            continue
        default = {**meta, "job": f"default/{monitor['metadata']['name']}"}
        kept = relabel(default, endpoint.get("relabelings", []))
        if kept is not None:
            targets.append((ports[endpoint["port"]], endpoint["path"], kept["job"]))
    return targets


def test_relabel_simulation_keeps_drops_and_replaces() -> None:
    source = {"sourceLabels": ["c"]}
    job = {**source, "targetLabel": "job", "replacement": "x-$1"}
    assert relabel({"c": "a"}, [job]) == {"c": "a", "job": "x-a"}
    assert relabel({"c": "a"}, [{**source, "regex": "b", "action": "keep"}, job]) is None
    assert relabel({"c": "ab"}, [{**source, "regex": "a", "action": "keep"}]) is None
    assert relabel({"c": "a"}, [{**source, "regex": "a", "action": "drop"}]) is None


def test_podmonitor_scrapes_every_pod_once_where_it_serves_metrics() -> None:
    """Each pod of every Deployment (the standalone relay's included) is one target, on
    the port that serves its /metrics (the API's, a worker's or the relay's metrics port;
    the transmitter's one port), as job session-close-<component>: what the alert rules
    select (tests/deploy/test_alerts_shared.py)."""
    (monitor,) = (doc for doc in base() if doc["kind"] == "PodMonitor")
    settings = assert_valid_settings(cluster_env())
    metrics_port = {
        "api": settings.metrics_port,
        "audit": settings.worker_metrics_port,
        "push-cleanup": settings.worker_metrics_port,
        "relay": settings.outbox_metrics_port,
        "signals": settings.signals_http_port,
    }
    scraped = set()
    for where, doc in deployments():
        component = doc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
        job = f"session-close-{component}"
        targets = scrape_targets(monitor, doc)
        assert targets == [(metrics_port[component], "/metrics", job)], f"{where}: {targets}"
        scraped.add(component)
    assert scraped == metrics_port.keys()
    assert "/metrics" in get_signals_routes()


def test_standalone_relay_is_probed_on_its_own_healthz_and_scraped() -> None:
    (relay,) = (
        d
        for d in with_component(RELAY)
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "session-close-relay"
    )
    container = relay["spec"]["template"]["spec"]["containers"][0]
    port = assert_valid_settings(cluster_env()).outbox_metrics_port
    assert [(p["name"], p["containerPort"]) for p in container["ports"]] == [("metrics", port)]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"] == "/healthz"
        assert probe_port(container, container[probe]) == port
    # The loop's heartbeat goes stale, then the probe fails failureThreshold times.
    liveness = container["livenessProbe"]
    assert (
        OUTBOX_STALE_AFTER_SECONDS + liveness["periodSeconds"] * liveness["failureThreshold"] <= 60
    )
    assert liveness["timeoutSeconds"] < liveness["periodSeconds"]
    # the PodMonitor scrapes the port by its name
    (monitor,) = (doc for doc in base() if doc["kind"] == "PodMonitor")
    assert "metrics" in {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}


def test_standalone_relay_component_moves_the_relay_out_of_the_api() -> None:
    rendered = {
        doc["metadata"]["name"]: doc for doc in with_component(RELAY) if doc["kind"] == "Deployment"
    }
    api = rendered["session-close-api"]["spec"]["template"]["spec"]["containers"][0]
    env = {var["name"]: var["value"] for var in api["env"]}
    assert env == {"RELAY_ENABLED": "false"}
    assert assert_valid_settings(env).relay_enabled is False
    relay = rendered["session-close-relay"]
    container = relay["spec"]["template"]["spec"]["containers"][0]
    assert_entry_point(container["command"])
    assert container["command"] == ["python", "-m", "outbox", "relay"]
    assert container["envFrom"] == api["envFrom"]
    assert relay["spec"]["replicas"] >= 2
    budgets = [
        doc
        for doc in with_component(RELAY)
        if doc["kind"] == "PodDisruptionBudget"
        and doc["spec"]["selector"]["matchLabels"].items()
        <= relay["spec"]["template"]["metadata"]["labels"].items()
    ]
    assert len(budgets) == 1
    # and without the component, the API keeps its relay
    plain = {doc["metadata"]["name"]: doc for doc in base() if doc["kind"] == "Deployment"}
    assert "env" not in plain["session-close-api"]["spec"]["template"]["spec"]["containers"][0]
