"""The series the alerts and the dashboard need beyond the request counters: the age of
the oldest outbox entry, and the process's CPU and memory (API and workers); and how
/metrics serves them: every family with a sample from start, no `_created` series, the
format and compression the scraper asks for."""

from __future__ import annotations

import dataclasses
import gzip
import tomllib
import urllib.request
from collections.abc import Iterator

import pytest
from aiohttp.pytest_plugin import AiohttpClient
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from service.app import create_app
from session_close.keys import Keys
from session_close.settings import Settings
from tests.support.paths import ROOT
from workers.metrics import WorkerMetrics


async def scrape(aiohttp_client: AiohttpClient, settings: Settings) -> dict[str, float]:
    # No relay: it would publish and delete the entries this test places.
    client = await aiohttp_client(create_app(dataclasses.replace(settings, relay_enabled=False)))
    resp = await client.get("/metrics")
    assert resp.status == 200
    return {
        s.name: s.value
        for family in text_string_to_metric_families(await resp.text())
        for s in family.samples
        if not s.labels
    }


async def test_oldest_outbox_entry_age_is_zero_when_the_outbox_is_empty(
    aiohttp_client: AiohttpClient, settings: Settings, redis: Redis, amqp_cleanup: None
) -> None:
    assert (await scrape(aiohttp_client, settings))["outbox_oldest_entry_age_seconds"] == 0


async def test_oldest_outbox_entry_age_comes_from_the_first_entry_id(
    aiohttp_client: AiohttpClient,
    settings: Settings,
    redis: Redis,
    keys: Keys,
    amqp_cleanup: None,
) -> None:
    seconds, _ = await redis.time()
    two_minutes_ago = (seconds - 120) * 1000
    await redis.xadd(keys.outbox(0), {"event": "{}"}, id=f"{two_minutes_ago}-0")
    await redis.xadd(keys.outbox(0), {"event": "{}"}, id="*")
    age = (await scrape(aiohttp_client, settings))["outbox_oldest_entry_age_seconds"]
    assert 120 <= age < 180, age


async def test_api_metrics_include_process_cpu_and_memory(
    aiohttp_client: AiohttpClient, settings: Settings, redis: Redis, amqp_cleanup: None
) -> None:
    values = await scrape(aiohttp_client, settings)
    assert values["process_resident_memory_bytes"] > 0
    assert "process_cpu_seconds_total" in values


def test_worker_metrics_include_process_cpu_and_memory() -> None:
    metrics = WorkerMetrics("audit")
    assert (metrics.registry.get_sample_value("process_resident_memory_bytes") or 0) > 0
    assert metrics.registry.get_sample_value("process_cpu_seconds_total") is not None


async def test_build_info_reports_pyprojects_version_in_the_api_and_the_workers(
    aiohttp_client: AiohttpClient, settings: Settings, redis: Redis, amqp_cleanup: None
) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    client = await aiohttp_client(create_app(dataclasses.replace(settings, relay_enabled=False)))
    text = await (await client.get("/metrics")).text()
    assert f'build_info{{version="{version}"}} 1.0' in text.splitlines()
    worker = WorkerMetrics("push-cleanup")
    assert worker.registry.get_sample_value("build_info", {"version": version}) == 1


OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


@pytest.fixture
def worker_metrics_url() -> Iterator[str]:
    metrics = WorkerMetrics("audit")
    port = metrics.serve(0, "127.0.0.1")
    yield f"http://127.0.0.1:{port}/metrics"
    metrics.close()


def worker_get(url: str, **headers: str) -> tuple[dict[str, str], bytes]:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as resp:
        return dict(resp.headers), resp.read()


def families(text: str) -> list[Metric]:
    return list(text_string_to_metric_families(text))


def without_samples(text: str) -> list[str]:
    return [
        f.name
        for f in families(text)
        if f.type in ("counter", "gauge", "histogram") and not f.samples
    ]


async def test_every_api_series_family_has_a_sample_from_start(
    aiohttp_client: AiohttpClient, settings: Settings, redis: Redis, amqp_cleanup: None
) -> None:
    client = await aiohttp_client(create_app(dataclasses.replace(settings, relay_enabled=False)))
    text = await (await client.get("/metrics")).text()
    assert without_samples(text) == []
    # the close routes' request series, before any close
    requests = {
        (s.labels["route"], s.labels["status"])
        for f in families(text)
        if f.name == "http_requests"
        for s in f.samples
    }
    for route in ("/v1.0/session/close", "/v1.0/session/close-all"):
        assert {(route, "200"), (route, "500"), (route, "503")} <= requests


def test_every_worker_series_family_has_a_sample_from_start(worker_metrics_url: str) -> None:
    _, body = worker_get(worker_metrics_url)
    assert without_samples(body.decode()) == []


async def test_no_created_series(
    aiohttp_client: AiohttpClient,
    settings: Settings,
    redis: Redis,
    amqp_cleanup: None,
    worker_metrics_url: str,
) -> None:
    client = await aiohttp_client(create_app(dataclasses.replace(settings, relay_enabled=False)))
    await client.post("/v1.0/session/close")  # a counted request and latency observation
    api = await (await client.get("/metrics")).text()
    _, worker = worker_get(worker_metrics_url)
    assert "_created" not in api
    assert "_created" not in worker.decode()


async def test_api_metrics_come_in_the_format_and_encoding_asked_for(
    aiohttp_client: AiohttpClient, settings: Settings, redis: Redis, amqp_cleanup: None
) -> None:
    client = await aiohttp_client(create_app(dataclasses.replace(settings, relay_enabled=False)))
    plain = await client.get("/metrics")
    assert plain.headers["Content-Type"].startswith("text/plain")
    resp = await client.get(
        "/metrics",
        headers={"Accept": OPENMETRICS, "Accept-Encoding": "gzip"},
        auto_decompress=False,
    )
    assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
    assert resp.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(await resp.read()).endswith(b"# EOF\n")


def test_worker_metrics_come_in_the_format_and_encoding_asked_for(
    worker_metrics_url: str,
) -> None:
    headers, body = worker_get(
        worker_metrics_url, Accept=OPENMETRICS, **{"Accept-Encoding": "gzip"}
    )
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(body).endswith(b"# EOF\n")
