"""A real Prometheus (Debian's package), on loopback with a generated config, scrapes a
running API (`python -m service`), a running worker (`python -m workers audit`) and the
transmitter (`python -m signals`) and loads deploy/prometheus/rules.yaml; `promtool check
metrics` passes on each /metrics; and every metric name that an alert or a dashboard
panel reads is one that they export (or is on the commented allowlist below)."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import asyncpg
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from session_close.settings import Settings
from signals.sets import write_new_key
from tests.support.processes import (
    free_port,
    listening_port,
    log_tail,
    running,
    settings_env,
    wait_for_port,
)
from tests.support.prometheus import (
    DASHBOARD,
    PROMETHEUS,
    PROMTOOL,
    RULES,
    needs_prometheus,
    needs_promtool,
)
from tests.support.promql import metric_names
from tests.support.waiting import wait_until
from tests.support.workers import AuditTable

# Names the alerts and the dashboard read that no process of this repository exports,
# each with the reason. Anything else missing from the live /metrics fails the test.
NOT_EXPORTED_HERE = {
    # RabbitMQ's rabbitmq_prometheus plugin, /metrics/detailed?family=queue_coarse_metrics
    # &family=queue_consumer_count (RabbitMQ 3.13 names); the broker on this machine does
    # not run the plugin, and this test does not reconfigure the shared broker.
    "rabbitmq_detailed_queue_messages": "RabbitMQ's rabbitmq_prometheus plugin",
    "rabbitmq_detailed_queue_messages_ready": "RabbitMQ's rabbitmq_prometheus plugin",
    "rabbitmq_detailed_queue_consumers": "RabbitMQ's rabbitmq_prometheus plugin",
    # Prometheus's own series, one per target it scrapes.
    "up": "Prometheus, per scrape target",
}
# The jobs the PodMonitor gives (deploy/k8s/podmonitor.yaml), which the rules select.
API_JOB, AUDIT_JOB, SIGNALS_JOB = (
    "session-close-api",
    "session-close-audit",
    "session-close-signals",
)


@dataclass
class Stack:
    api_port: int
    worker_port: int
    signals_port: int
    logs: dict[str, Path]

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.api_port, self.worker_port, self.signals_port)

    def tails(self) -> str:
        return "\n".join(f"--- {name}\n{log_tail(path)}" for name, path in self.logs.items())


@pytest.fixture
async def stack(
    settings: Settings,
    redis: Redis,
    amqp_cleanup: None,
    audit_table: AuditTable,
    tmp_path: Path,
) -> AsyncIterator[Stack]:
    """The API (relay included), the audit worker and the transmitter, as processes, on
    free ports."""
    key = tmp_path / "signing.pem"
    write_new_key(str(key), bits=2048)
    schema = f"signals_{settings.audit_table}"
    # Port 0: each process binds a free port and logs it, so there is no port to race for.
    env = settings_env(
        settings,
        HTTP_HOST="127.0.0.1",
        HTTP_PORT="0",
        WORKER_METRICS_PORT="0",
        LOG_LEVEL="INFO",
        SIGNALS_HTTP_HOST="127.0.0.1",
        SIGNALS_HTTP_PORT="0",
        SIGNALS_SIGNING_KEY_FILES=str(key),
        SIGNALS_ISSUER="https://signals.example",
        SIGNALS_DB_SCHEMA=schema,
    )
    logs = {name: tmp_path / f"{name}.log" for name in ("api", "audit", "signals")}
    try:
        with ExitStack() as processes:
            api = processes.enter_context(running(["service"], env, logs["api"]))
            worker = processes.enter_context(running(["workers", "audit"], env, logs["audit"]))
            signals = processes.enter_context(running(["signals"], env, logs["signals"]))
            api_port = listening_port(logs["api"], api)
            worker_port = listening_port(logs["audit"], worker, message="serving metrics")
            signals_port = listening_port(logs["signals"], signals, message="signals listening")
            yield Stack(api_port, worker_port, signals_port, logs)
    finally:
        conn = await asyncpg.connect(settings.database_url)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


async def get_text(url: str) -> str:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
        session.get(url) as resp,
    ):
        assert resp.status == 200, url
        return await resp.text()


async def get_json(url: str) -> Any:
    return json.loads(await get_text(url))


def exported_names(text: str) -> set[str]:
    """Every series name a scrape of this text can hold, also for families that have no
    samples yet (a labelled counter before its first increment)."""
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("_sum", "_count"),
    }
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(family.name + s for s in suffixes.get(family.type, ()))
        names.update(sample.name for sample in family.samples)
    return names


def rules() -> list[dict[str, Any]]:
    return [
        rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
    ]


def used_names() -> dict[str, set[str]]:
    """metric name -> where it is used (alert, recording rule or panel), without the
    names the recording rules write."""
    used: dict[str, set[str]] = {}
    for rule in rules():
        where = f"alert {rule['alert']}" if "alert" in rule else f"record {rule['record']}"
        for name in metric_names(rule["expr"]):
            used.setdefault(name, set()).add(where)
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            for name in metric_names(target["expr"]):
                used.setdefault(name, set()).add(f"panel {panel['title']!r}")
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    return {name: where for name, where in used.items() if name not in recorded}


async def test_alerts_and_dashboard_read_only_metrics_the_processes_export(
    stack: Stack,
) -> None:
    live: set[str] = set()
    for port in stack.ports:
        live |= exported_names(await get_text(f"http://127.0.0.1:{port}/metrics"))
    used = used_names()
    missing = {
        name: sorted(where)
        for name, where in used.items()
        if name not in live and name not in NOT_EXPORTED_HERE
    }
    assert not missing, (
        "metrics read by alerts/panels but exported by no process:\n"
        + "\n".join(f"  {name}: used by {', '.join(where)}" for name, where in missing.items())
        + f"\nexported: {sorted(live)}"
    )
    stale = {name for name in NOT_EXPORTED_HERE if name in live or name not in used}
    assert not stale, f"allowlist entries to remove (now exported, or no longer used): {stale}"


@needs_promtool
async def test_promtool_check_metrics_passes_on_each_metrics_endpoint(stack: Stack) -> None:
    assert PROMTOOL is not None
    for port in stack.ports:
        text = await get_text(f"http://127.0.0.1:{port}/metrics")
        done = await asyncio.to_thread(
            subprocess.run,
            [PROMTOOL, "check", "metrics"],
            input=text,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0, f"port {port}: {done.stdout}{done.stderr}"


@pytest.fixture
def prometheus(stack: Stack, tmp_path: Path) -> Iterator[int]:
    """Prometheus on a free loopback port, scraping the stack every second, with the
    rules file loaded; its data in tmp_path."""
    assert PROMETHEUS is not None
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": API_JOB,
                "static_configs": [
                    {"targets": [f"127.0.0.1:{stack.api_port}"], "labels": {"namespace": "test"}}
                ],
            },
            {
                "job_name": AUDIT_JOB,
                "static_configs": [
                    {
                        "targets": [f"127.0.0.1:{stack.worker_port}"],
                        "labels": {"namespace": "test"},
                    }
                ],
            },
            {
                "job_name": SIGNALS_JOB,
                "static_configs": [
                    {
                        "targets": [f"127.0.0.1:{stack.signals_port}"],
                        "labels": {"namespace": "test"},
                    }
                ],
            },
        ],
    }
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    log = tmp_path / "prometheus.log"
    stack.logs["prometheus"] = log
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config_file}",
                f"--web.listen-address=127.0.0.1:{port}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for_port(port, proc, deadline=30)
            yield port
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@needs_prometheus
async def test_prometheus_scrapes_the_api_and_a_worker_and_loads_the_rules(
    stack: Stack, prometheus: int
) -> None:
    base = f"http://127.0.0.1:{prometheus}/api/v1"

    async def ready() -> bool:
        # Prometheus listens before its storage is open, and answers 503 until then.
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
            session.get(f"http://127.0.0.1:{prometheus}/-/ready") as resp,
        ):
            return resp.status == 200

    async def all_up() -> bool:
        targets = (await get_json(f"{base}/targets"))["data"]["activeTargets"]
        return sorted((t["labels"]["job"], t["health"]) for t in targets) == [
            (API_JOB, "up"),
            (AUDIT_JOB, "up"),
            (SIGNALS_JOB, "up"),
        ]

    async def scraped(query: str) -> bool:
        data = (await get_json(f"{base}/query?{urlencode({'query': query})}"))["data"]
        return bool(data["result"])

    try:
        await wait_until(ready, "Prometheus ready", within=30)
        await wait_until(all_up, "every target up in Prometheus", within=45)
        # a sample of each process's own series, stored and queryable
        await wait_until(lambda: scraped("outbox_backlog"), "outbox_backlog scraped", within=30)
        await wait_until(
            lambda: scraped(f'worker_messages_total{{job="{AUDIT_JOB}"}}'),
            "worker series scraped",
            within=30,
        )
        await wait_until(
            lambda: scraped(f'worker_messages_total{{job="{SIGNALS_JOB}"}}'),
            "transmitter series scraped",
            within=30,
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{stack.tails()}") from None

    expected = {rule.get("alert") or rule["record"] for rule in rules()}

    async def rules_evaluated() -> bool:
        groups = (await get_json(f"{base}/rules"))["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return {r["name"] for r in rules} == expected and all(
            r.get("lastEvaluation", "").startswith("20") for r in rules
        )

    await wait_until(rules_evaluated, "every rule loaded and evaluated", within=30)
    groups = (await get_json(f"{base}/rules"))["data"]["groups"]
    for rule in (rule for group in groups for rule in group["rules"]):
        assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"


@needs_prometheus
async def test_the_slis_select_the_live_series_of_the_api(stack: Stack, prometheus: int) -> None:
    """The recording rules' selectors (job, namespace, the session routes' labels, the
    0.25 bucket) match what the API really exports: each SLI gets a series for the API's
    job and namespace, and none for the worker's."""
    base = f"http://127.0.0.1:{prometheus}/api/v1"

    async def recorded(name: str) -> list[dict[str, str]]:
        try:
            data = (await get_json(f"{base}/query?{urlencode({'query': name})}"))["data"]
        except (aiohttp.ClientError, AssertionError):
            return []  # not ready yet
        return [sample["metric"] for sample in data["result"]]

    for sli in ("close_errors", "close_slow"):
        name = f"session_close:{sli}:ratio_rate5m"

        async def has_samples(name: str = name) -> bool:
            return bool(await recorded(name))

        await wait_until(has_samples, f"{name} recorded", within=60)
        labels = await recorded(name)
        assert labels == [{"__name__": name, "job": API_JOB, "namespace": "test"}], labels
