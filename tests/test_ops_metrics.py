"""The series the alerts and the dashboard need beyond the request counters: the age of
the oldest outbox entry, and the process's CPU and memory (API and workers)."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

from aiohttp.pytest_plugin import AiohttpClient
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from service.app import create_app
from session_close.keys import Keys
from session_close.settings import Settings
from workers.metrics import WorkerMetrics

ROOT = Path(__file__).resolve().parents[1]


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
    await redis.xadd(keys.outbox, {"event": "{}"}, id=f"{two_minutes_ago}-0")
    await redis.xadd(keys.outbox, {"event": "{}"}, id="*")
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
