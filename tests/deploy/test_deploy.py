"""deploy/ cannot be run here (no Docker engine, no cluster), so this reads every file in
it and checks that it agrees with the code: variable names and values the settings
accept, commands that are real entry points, ports and probe paths the API and the
transmitter (`python -m signals`) serve, and KEDA queue names the topology declares."""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from typing import Any, cast
from urllib.parse import urlsplit

import pytest
import yaml
from aiohttp import web

from service.app import create_app
from session_close.redis_client import DURABLE
from session_close.settings import Settings, SettingsSchema
from session_close.topology import TRANSMITTER as SIGNALS_WORKER
from session_close.topology import WORKERS, Topology
from signals.app import transmitter_app
from signals.ssf import SsfApi
from tests.support.paths import ROOT
from workers.metrics import STALE_AFTER_SECONDS
from workers.runner import Worker

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SETTING_NAMES = frozenset(SettingsSchema.fields)
IMAGE = "eliab-session-close"
# The project's packages (pyproject.toml's packages.find), every one in the image.
PACKAGES = ("session_close", "service", "outbox", "workers", "signals")
# The transmitter's entry point.
SIGNALS = ["python", "-m", "signals"]

Manifest = dict[str, Any]


def test_every_file_under_deploy_is_checked_here() -> None:
    known = {
        DEPLOY / "Dockerfile",
        DEPLOY / "Dockerfile.dockerignore",
        DEPLOY / "compose.yaml",
        K8S / "secret.env.example",
        DEPLOY / "rabbitmq" / "enabled_plugins",
        *K8S.glob("*.yaml"),
        # checked by tests/deploy/test_alerts.py, test_dashboard.py and test_prometheus_live.py
        DEPLOY / "prometheus" / "rules.yaml",
        DEPLOY / "prometheus" / "prometheusrule.py",
        DEPLOY / "grafana" / "dashboard.py",
        DEPLOY / "grafana" / "session-close.json",
        # checked by tests/deploy/test_k8s_validate.py
        *(K8S / "components").rglob("*.yaml"),
        K8S / "components" / "standalone-relay" / "README.md",
    }
    files = {p for p in DEPLOY.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert files == known


# --- what the code offers -----------------------------------------------------------


@functools.cache
def console_scripts() -> dict[str, str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        scripts: dict[str, str] = tomllib.load(f)["project"]["scripts"]
    return scripts


@functools.cache
def accepts(argv: tuple[str, ...]) -> bool:
    """The command exists and takes these arguments: `<command> --help` exits 0."""
    if argv[0] in console_scripts():
        module = console_scripts()[argv[0]].split(":")[0].removesuffix(".__main__")
        argv = ("python", "-m", module, *argv[1:])
    if argv[:2] != ("python", "-m"):
        return False
    done = subprocess.run(
        [sys.executable, *argv[1:], "--help"], cwd=ROOT, capture_output=True, timeout=30
    )
    return done.returncode == 0


def assert_entry_point(argv: list[str]) -> None:
    assert argv[:2] == ["python", "-m"] or argv[0] in console_scripts(), argv
    if argv[0] == "python":
        assert argv[2] in PACKAGES, argv
        assert argv[2] != "session_close", argv
    assert accepts(tuple(argv)), f"not an entry point: {shlex.join(argv)}"


def chained(command: list[str]) -> list[list[str]]:
    """The commands a compose `command` runs: itself, or those of its `sh -c` script (only
    `a && b && exec c`, each an argv), the last one exec'd so that it takes SIGTERM."""
    if command[:2] != ["sh", "-c"]:
        return [command]
    (script,) = command[2:]
    steps = [shlex.split(step) for step in script.split("&&")]
    assert all(steps), script
    assert steps[-1][0] == "exec", f"{script}: the process must take SIGTERM itself (exec)"
    assert not any(step[0] == "exec" for step in steps[:-1]), script
    steps[-1] = steps[-1][1:]
    for step in steps:
        assert not set(step) & {"|", ";", "||", "&", ">", "<"}, f"{script}: only &&"
    return steps


def main_command(command: list[str]) -> list[str]:
    """The process a compose `command` leaves running: the last (exec'd) of its chain."""
    return chained(command)[-1]


def worker_of(argv: list[str]) -> str | None:
    return argv[3] if argv[:3] == ["python", "-m", "workers"] and len(argv) > 3 else None


def get_paths(app: web.Application) -> frozenset[str]:
    return frozenset(
        resource.canonical
        for resource in app.router.resources()
        if any(route.method == "GET" for route in resource)
    )


@functools.cache
def get_routes() -> frozenset[str]:
    """What the API serves (GET)."""
    return get_paths(create_app(Settings()))


@functools.cache
def get_signals_routes() -> frozenset[str]:
    """What the transmitter serves (GET): signals/app.py's app as run_transmitter builds
    it, over backends it never reaches here."""
    settings = Settings()
    unused = cast(Any, None)
    worker = Worker(settings, SIGNALS_WORKER, unused)
    ssf = SsfApi(unused, unused, unused, issuer=settings.signals_issuer, allow_http=True)
    return get_paths(transmitter_app(unused, unused, worker, unused, [], ssf))


def assert_valid_settings(env: Mapping[str, str]) -> Settings:
    unknown = set(env) - SETTING_NAMES
    assert not unknown, f"not settings: {sorted(unknown)}"
    return Settings.from_env(env)  # raises SettingsError naming a bad value


def test_the_checks_themselves_reject_what_is_wrong() -> None:
    assert not accepts(("python", "-m", "workers", "no-such-worker"))
    assert not accepts(("python", "-m", "outbox", "no-such-command"))
    assert not accepts(("python", "-m", "no_such_module"))
    assert not accepts(("python", "-m", "signals", "no-such-command"))
    assert accepts(("session-workers", "push-cleanup"))
    assert accepts(("session-signals",))
    assert "/readyz" in get_routes()
    assert "/nope" not in get_routes()
    assert {"/healthz", "/readyz", "/metrics", "/jwks.json"} <= get_signals_routes()
    assert "/v1.0/session/close" not in get_signals_routes()
    assert chained(["sh", "-c", "a b && exec c"]) == [["a", "b"], ["c"]]
    for script in ("a && c", "exec a && exec c", "a; exec c", "a && exec c > f"):
        with pytest.raises(AssertionError):
            chained(["sh", "-c", script])


# --- Dockerfile ---------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def test_dockerfile_is_multi_stage_and_runs_as_non_root() -> None:
    steps = dockerfile()
    stages = [args for op, args in steps if op == "FROM"]
    assert len(stages) >= 2
    assert any(op == "COPY" and args.startswith("--from=") for op, args in steps)
    final = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM") :]
    users = [args for op, args in final if op == "USER"]
    assert users, "the runtime stage sets no USER"
    assert users[-1].split(":")[0] not in ("root", "0")


def test_dockerfile_command_port_and_env_match_the_code() -> None:
    steps = dockerfile()
    cmd = yaml.safe_load([args for op, args in steps if op == "CMD"][-1])
    assert_entry_point(cmd)
    env: dict[str, str] = {}
    for op, args in steps:
        if op == "ENV":
            env |= dict(pair.split("=", 1) for pair in shlex.split(args))
    ours = {k: v for k, v in env.items() if not k.startswith(("PATH", "PYTHON", "PIP_"))}
    settings = assert_valid_settings(ours)
    exposed = [int(args.split("/")[0]) for op, args in steps if op == "EXPOSE"]
    assert exposed == [settings.http_port]
    copied = set()
    for op, args in steps:
        if op == "COPY" and not args.startswith("--from="):
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), source
                copied.add(source)
    # every package of the project is in the image (the API imports outbox)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    found = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    assert sorted(PACKAGES) == sorted(name.removesuffix("*") for name in found)
    assert set(PACKAGES) <= copied


def test_the_build_context_holds_what_the_dockerfile_copies() -> None:
    """Dockerfile.dockerignore excludes everything, then lets in what the build copies:
    a COPY of a path it keeps out fails the build ("not found")."""
    lines = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    patterns = [line for line in lines if line and not line.startswith("#")]
    assert patterns[0] == "**"
    allowed = {p[1:].removesuffix("/**") for p in patterns if p.startswith("!")}
    sources = {
        source
        for op, args in dockerfile()
        if op == "COPY" and not args.startswith("--from=")
        for source in args.split()[:-1]
    }
    assert sources == allowed


# --- compose ------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return data


def our_services() -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in compose()["services"].items()
        if str(service.get("image", "")).startswith(IMAGE)
    }


def test_compose_has_the_whole_stack() -> None:
    services = compose()["services"]
    assert {"redis", "rabbitmq", "postgres"} <= services.keys()
    assert "management" in services["rabbitmq"]["image"]
    commands = {name: main_command(s["command"]) for name, s in our_services().items()}
    assert sorted(commands.values()) == sorted(
        [["python", "-m", "service"], SIGNALS] + [["python", "-m", "workers", w] for w in WORKERS]
    )
    for name, service in our_services().items():
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (DEPLOY / service["build"]["context"] / "deploy" / "Dockerfile").exists()
        assert service["deploy"]["replicas"] >= 1, name
        assert set(service["depends_on"]) <= services.keys()


def test_compose_runs_redis_durably() -> None:
    command = compose()["services"]["redis"]["command"]
    assert command[0] == "redis-server"
    options = dict(zip(command[1::2], command[2::2], strict=True))
    for name, good in DURABLE.items():
        assert options.get(f"--{name}") in good, name


def test_compose_sentinel_profile_replicates_before_it_promises() -> None:
    """Opt-in: a primary, two replicas (one more than REDIS_MIN_REPLICAS=1) and
    three Sentinels; every node durable and taking writes only while a replica follows."""
    services = compose()["services"]
    profile = {name: s for name, s in services.items() if "sentinel" in s.get("profiles", [])}
    assert not any(s.get("profiles") for s in our_services().values())
    nodes = {name: s for name, s in profile.items() if s["command"][0] == "redis-server"}
    sentinels = {name: s for name, s in profile.items() if name not in nodes}
    assert len(nodes) == 3
    assert len(sentinels) == 3
    replicas = set()
    for name, node in nodes.items():
        options = dict(zip(node["command"][1::2], node["command"][2::2], strict=True))
        for option, good in DURABLE.items():
            assert options.get(f"--{option}") in good, (name, option)
        assert options["--min-replicas-to-write"] == "1", name
        if "--replicaof" in options:
            replicas.add(name)
            primary, port = options["--replicaof"].split()
            assert port == "6379"
    assert len(replicas) == 2
    assert primary in nodes
    assert primary not in replicas
    for name, sentinel in sentinels.items():
        script = sentinel["command"][-1]
        assert f"sentinel monitor sessions {primary} 6379 2" in script, name
        assert "--sentinel" in script, name


def test_the_image_is_labelled_and_tagged_with_the_one_version() -> None:
    """pyproject.toml is the source; the Dockerfile takes it as a build argument (and
    fails the build on a mismatch), and the deploy files run that release."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert 'org.opencontainers.image.version="${VERSION}"' in dockerfile
    assert "s.__version__ != '${VERSION}'" in dockerfile
    for name, service in our_services().items():
        assert service["image"] == f"{IMAGE}:{version}", name
        assert service["build"]["args"]["VERSION"] == version, name
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert [image["newTag"] for image in kustomization["images"]] == [version]


def test_compose_enables_rabbitmqs_prometheus_plugin() -> None:
    """Queue depth, consumers and dead letters, which the alerts read, come from it."""
    rabbitmq = compose()["services"]["rabbitmq"]
    source, target = rabbitmq["volumes"][0].split(":")[:2]
    assert target == "/etc/rabbitmq/enabled_plugins"
    plugins = (DEPLOY / source).read_text().strip()
    assert plugins.startswith("[")
    assert plugins.endswith("].")
    assert {"rabbitmq_prometheus", "rabbitmq_management"} <= {
        name.strip() for name in plugins[1:-2].split(",")
    }
    assert "15692:15692" in rabbitmq["ports"]


def test_compose_commands_env_ports_and_healthcheck_match_the_code() -> None:
    services = compose()["services"]
    for name, service in our_services().items():
        for argv in chained(service["command"]):
            assert_entry_point(argv)
        settings = assert_valid_settings(service["environment"])
        for url in (settings.redis_url, settings.amqp_url, settings.database_url):
            assert urlsplit(url).hostname in services, f"{name}: {url}"
        if service["command"] == ["python", "-m", "service"]:
            published = [p.split(":") for p in service["ports"]]
            assert [int(container) for _, container in published] == [settings.http_port]
            assert settings.metrics_port not in (None, settings.http_port)  # not published
            check = service["healthcheck"]["test"][-1]
            assert f"127.0.0.1:{settings.http_port}/readyz" in check
            assert "/readyz" in get_routes()
        elif main_command(service["command"]) == SIGNALS:
            published = [p.split(":") for p in service["ports"]]
            assert [int(container) for _, container in published] == [settings.signals_http_port]
            check = service["healthcheck"]["test"]
            assert check[0] == "CMD", name
            paths = re.findall(rf"127\.0\.0\.1:{settings.signals_http_port}(/\w+)", check[-1])
            assert paths == ["/healthz"], name
            assert "/healthz" in get_signals_routes()
        else:
            assert settings.worker_metrics_port is not None, name


def compose_signals() -> dict[str, Any]:
    (service,) = (s for s in our_services().values() if main_command(s["command"]) == SIGNALS)
    return service


def test_compose_runs_the_transmitter_with_a_kept_key_for_local_use() -> None:
    """It makes its signing key once, where SIGNALS_SIGNING_KEY_FILES reads it, in a named
    volume (kept across restarts); its issuer is the address compose publishes, http, as
    SIGNALS_ALLOW_HTTP lets a local stack be; it waits for its backends (not Redis)."""
    service = compose_signals()
    settings = assert_valid_settings(service["environment"])
    steps = chained(service["command"])
    assert steps == [
        ["python", "-m", "signals", "keygen", settings.signals_signing_key_files],
        SIGNALS,
    ]
    volumes = {target: source for source, target in (v.split(":")[:2] for v in service["volumes"])}
    key_dir = settings.signals_signing_key_files.rsplit("/", 1)[0]
    assert volumes[key_dir] in compose()["volumes"], "not a named volume: the key would go"
    (published,) = service["ports"]
    host_port, container_port = (int(p) for p in published.split(":"))
    assert container_port == settings.signals_http_port
    assert settings.signals_issuer == f"http://localhost:{host_port}"
    assert settings.signals_allow_http is True
    assert {"rabbitmq", "postgres"} <= service["depends_on"].keys()
    assert "redis" not in service["depends_on"]
    assert all(d["condition"] == "service_healthy" for d in service["depends_on"].values())
    # SIGTERM: the deliveries in flight have SHUTDOWN_TIMEOUT_SECONDS
    assert int(service["stop_grace_period"].removesuffix("s")) > settings.shutdown_timeout_seconds


# --- Kubernetes ---------------------------------------------------------------------


def kustomization() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return data


def manifests() -> list[Manifest]:
    return [
        doc
        for name in kustomization()["resources"]
        for doc in yaml.safe_load_all((K8S / name).read_text())
        if doc
    ]


def of_kind(kind: str) -> dict[str, Manifest]:
    return {m["metadata"]["name"]: m for m in manifests() if m["kind"] == kind}


def containers() -> Iterator[tuple[Manifest, dict[str, Any]]]:
    for deployment in of_kind("Deployment").values():
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            yield deployment, container


# The Secret is created outside `kubectl apply -k` (so an apply never overwrites the real
# one), from the keys of this example.
SECRET = "session-close-secrets"
# The transmitter's signing keys: a Secret of PEM files, also created outside (the
# example's comments say how), mounted read-only.
SIGNALS_KEYS = "session-close-signals-keys"


def secret_env() -> dict[str, str]:
    lines = (K8S / "secret.env.example").read_text().splitlines()
    pairs = (line.split("=", 1) for line in lines if line and not line.startswith("#"))
    return {name: value for name, value in pairs}


def cluster_env() -> dict[str, str]:
    """What envFrom gives every container: the ConfigMap and the Secret together."""
    env: dict[str, str] = {}
    for config in of_kind("ConfigMap").values():
        env |= config["data"]
    return env | secret_env()


def test_kustomization_lists_every_manifest() -> None:
    listed = set(kustomization()["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert [i["name"] for i in kustomization()["images"]] == [IMAGE]


def test_configmap_and_secret_hold_valid_settings_only() -> None:
    configs = of_kind("ConfigMap")
    assert len(configs) == 1
    assert not of_kind("Secret"), "a Secret in resources: an apply overwrites the real one"
    secret_names = set(secret_env())
    # credentials live in the Secret only
    assert {"REDIS_URL", "AMQP_URL", "DATABASE_URL"} == secret_names
    assert not secret_names & set(next(iter(configs.values()))["data"])
    settings = assert_valid_settings(cluster_env())
    # the transmitter is public: an https issuer, and receivers at public addresses only
    assert urlsplit(settings.signals_issuer).scheme == "https"
    assert settings.signals_allow_http is False
    # its keys' Secret: created as the example says, never among the resources
    example = (K8S / "secret.env.example").read_text()
    assert f"kubectl create secret generic {SIGNALS_KEYS} --from-file=" in example


def test_deployments_run_entry_points_with_probes_resources_and_env() -> None:
    workers_seen = set()
    commands = []
    for deployment, container in containers():
        name = deployment["metadata"]["name"]
        pod = deployment["spec"]["template"]
        assert container["image"] == IMAGE
        assert_entry_point(container["command"] + container.get("args", []))
        assert set(pod["metadata"]["labels"].items()) >= set(
            deployment["spec"]["selector"]["matchLabels"].items()
        )
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        refs = {
            next(iter(ref.values()))["name"] for ref in container["envFrom"]
        }  # configMapRef / secretRef
        assert refs == set(of_kind("ConfigMap")) | {SECRET}, name
        for var in container.get("env", []):
            assert var["name"] in SETTING_NAMES, var["name"]
        resources = container["resources"]
        assert {"cpu", "memory"} <= resources["requests"].keys(), name
        assert "memory" in resources["limits"], name
        assert {"livenessProbe", "readinessProbe"} <= container.keys(), name
        if (worker := worker_of(container["command"])) is not None:
            workers_seen.add(worker)
        commands.append(container["command"])
    assert workers_seen == set(WORKERS)
    assert commands.count(["python", "-m", "service"]) == 1
    assert commands.count(SIGNALS) == 1


def probe_port(container: dict[str, Any], probe: dict[str, Any]) -> int:
    port = probe["httpGet"]["port"]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    return int(named[port] if isinstance(port, str) else port)


def test_api_ports_and_probe_paths_match_the_app() -> None:
    settings = assert_valid_settings(cluster_env())
    api = [(d, c) for d, c in containers() if c["command"] == ["python", "-m", "service"]]
    assert len(api) == 1
    deployment, container = api[0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": settings.http_port, "metrics": settings.metrics_port}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(settings.metrics_port)
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in get_routes()
        assert probe_port(container, container[probe]) == settings.http_port
    # SIGTERM must have time for the requests in flight and the relay's last confirms
    pod = deployment["spec"]["template"]["spec"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    needed = int(pre_stop[1]) + settings.shutdown_timeout_seconds + settings.publish_timeout_seconds
    assert pod["terminationGracePeriodSeconds"] > needed
    service = of_kind("Service")[deployment["metadata"]["name"]]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    # /metrics stays off the public Service: its port is neither a target nor a port there.
    exposed = {str(v) for p in service["spec"]["ports"] for v in (p["port"], p["targetPort"])}
    assert not exposed & {"metrics", str(settings.metrics_port)}


def signals_deployment() -> tuple[Manifest, dict[str, Any]]:
    (found,) = [(d, c) for d, c in containers() if c["command"] == SIGNALS]
    return found


def test_signals_ports_probe_paths_and_service_match_the_app() -> None:
    deployment, container = signals_deployment()
    env = cluster_env() | {var["name"]: var["value"] for var in container.get("env", [])}
    settings = assert_valid_settings(env)
    # one port, named as the API's public one: the SSF endpoints, probes and /metrics
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": settings.signals_http_port}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(settings.signals_http_port)
    assert annotations["prometheus.io/path"] in get_signals_routes()
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in get_signals_routes()
        assert probe_port(container, container[probe]) == settings.signals_http_port
        assert container[probe]["timeoutSeconds"] < container[probe]["periodSeconds"]
    # The loop's heartbeat goes stale, then the probe fails failureThreshold times.
    liveness = container["livenessProbe"]
    assert STALE_AFTER_SECONDS + liveness["periodSeconds"] * liveness["failureThreshold"] <= 60
    # SIGTERM: out of the Service first, then the deliveries in flight
    pod = deployment["spec"]["template"]["spec"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert (
        pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + settings.shutdown_timeout_seconds
    )
    # a rollout never takes a copy away before its successor is ready
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    service = of_kind("Service")[deployment["metadata"]["name"]]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]


def test_signals_reads_its_signing_keys_from_their_own_secret_read_only() -> None:
    deployment, container = signals_deployment()
    pod = deployment["spec"]["template"]["spec"]
    env = {var["name"]: var["value"] for var in container["env"]}
    settings = assert_valid_settings(cluster_env() | env)
    # the path goes with the mount, in the Deployment; not in the ConfigMap
    assert "SIGNALS_SIGNING_KEY_FILES" not in cluster_env()
    files = [f.strip() for f in settings.signals_signing_key_files.split(",") if f.strip()]
    assert files
    volumes = {v["name"]: v for v in pod["volumes"]}
    (mount,) = container["volumeMounts"]
    assert mount["readOnly"] is True
    secret = volumes[mount["name"]]["secret"]
    assert secret["secretName"] == SIGNALS_KEYS
    for name in files:
        directory, _, key = name.rpartition("/")
        assert directory == mount["mountPath"], name
        assert key, name
    # readable by the process's group only (the files' group is fsGroup), never by others
    context = pod["securityContext"]
    assert context["fsGroup"] == context["runAsGroup"]
    assert secret["defaultMode"] & 0o007 == 0
    assert secret["defaultMode"] & 0o040
    assert not of_kind("Secret")


def test_worker_probes_use_their_metrics_port() -> None:
    settings = assert_valid_settings(cluster_env())
    for _, container in containers():
        if worker_of(container["command"]) is None:
            continue
        assert [p["containerPort"] for p in container["ports"]] == [settings.worker_metrics_port]
        assert container["readinessProbe"]["httpGet"]["path"] == "/metrics"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        for probe in ("readinessProbe", "livenessProbe"):
            assert probe_port(container, container[probe]) == settings.worker_metrics_port
        # The loop's heartbeat goes stale, then the probe fails failureThreshold times.
        liveness = container["livenessProbe"]
        assert STALE_AFTER_SECONDS + liveness["periodSeconds"] * liveness["failureThreshold"] <= 60


def test_pod_disruption_budgets_cover_every_deployment() -> None:
    budgets = of_kind("PodDisruptionBudget")
    covered = set()
    for budget in budgets.values():
        selector = budget["spec"]["selector"]["matchLabels"]
        matches = [
            name
            for name, d in of_kind("Deployment").items()
            if d["spec"]["template"]["metadata"]["labels"].items() >= selector.items()
        ]
        assert len(matches) == 1, budget["metadata"]["name"]
        covered.update(matches)
    assert covered == set(of_kind("Deployment"))


def test_hpas_scale_the_api_and_the_transmitter_on_cpu() -> None:
    scaled = []
    for hpa in of_kind("HorizontalPodAutoscaler").values():
        target = of_kind("Deployment")[hpa["spec"]["scaleTargetRef"]["name"]]
        scaled.append(target["spec"]["template"]["spec"]["containers"][0]["command"])
        assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
        # two copies at least: the PDB lets one go, and the other still serves
        assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    assert sorted(scaled) == sorted([["python", "-m", "service"], SIGNALS])


def test_keda_scales_each_worker_on_its_own_queue() -> None:
    settings = assert_valid_settings(cluster_env())
    topology = Topology.from_settings(settings)
    auths = of_kind("TriggerAuthentication")
    scaled = {}
    for obj in of_kind("ScaledObject").values():
        deployment = of_kind("Deployment")[obj["spec"]["scaleTargetRef"]["name"]]
        worker = worker_of(deployment["spec"]["template"]["spec"]["containers"][0]["command"])
        assert worker is not None
        (trigger,) = obj["spec"]["triggers"]
        assert trigger["type"] == "rabbitmq"
        assert trigger["metadata"]["mode"] == "QueueLength"
        assert trigger["metadata"]["queueName"] == topology.queue(worker)
        auth = auths[trigger["authenticationRef"]["name"]]
        for ref in auth["spec"]["secretTargetRef"]:
            assert ref["name"] == SECRET
            assert ref["key"] in secret_env()
        scaled[worker] = obj
    assert scaled.keys() == set(WORKERS)


@pytest.mark.parametrize("path", sorted(p.name for p in K8S.glob("*.yaml")))
def test_every_manifest_names_its_api_and_kind(path: str) -> None:
    for doc in yaml.safe_load_all((K8S / path).read_text()):
        assert {"apiVersion", "kind"} <= doc.keys()
        if doc["kind"] != "Kustomization":
            assert doc["metadata"]["name"]
