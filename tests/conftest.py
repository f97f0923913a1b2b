"""Fixtures shared by every test. Tests talk to the real Redis, RabbitMQ and PostgreSQL
on localhost (URLs from REDIS_URL, AMQP_URL, DATABASE_URL when set); each test gets its
own Redis key prefix, exchange and queue names, and audit table, so tests never see each
other's data."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import pytest
from _pytest.terminal import TerminalReporter
from aiohttp import web
from aiohttp.pytest_plugin import AiohttpClient
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from service.app import create_app
from service.appkeys import AMQP
from session_close.keys import Keys
from session_close.settings import Settings
from session_close.topology import Topology
from tests.support.proxy import TcpProxy

# How long the cleanup of a test's Redis keys may take.
CLEANUP_SECONDS = 30.0

# The workers' fixtures (broker, audit_table, worker_processes), for every test module;
# the OTLP trace receiver (receiver);
# the needs_tool marker (skipped where a tool is missing, failed under CI=true).
pytest_plugins = ["tests.support.workers", "tests.support.tools", "tests.support.otlp"]


@pytest.fixture
def test_id() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
def settings(test_id: str) -> Settings:
    base = Settings.from_env()
    return dataclasses.replace(
        base,
        redis_key_prefix=f"test:{test_id}:",
        amqp_exchange=f"test.{test_id}.sessions",
        amqp_queue_prefix=f"test.{test_id}.",
        audit_table=f"audit_{test_id}",
        publish_timeout_seconds=1.0,
    )


@pytest.fixture
def keys(settings: Settings) -> Keys:
    return Keys(settings.redis_key_prefix)


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    client = Redis.from_url(settings.redis_url, decode_responses=True, socket_timeout=30)
    yield client
    # Bounded: a test that its timeout ended mid-command can leave the client's pool
    # locked, and the cleanup must then fail, not hang the run.
    async with asyncio.timeout(CLEANUP_SECONDS):
        found = [
            k async for k in client.scan_iter(match=f"{settings.redis_key_prefix}*", count=1000)
        ]
        for start in range(0, len(found), 1000):
            await client.unlink(*found[start : start + 1000])
    await client.aclose()


@pytest.fixture
async def amqp_cleanup(settings: Settings) -> AsyncIterator[None]:
    """Deletes the test's exchanges and queues afterwards."""
    yield
    topology = Topology.from_settings(settings)
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        for worker in ("audit", "push-cleanup", "signals"):
            for name in (topology.queue(worker), topology.dead_letter_queue(worker)):
                await channel.queue_delete(name)
        await channel.exchange_delete(topology.exchange)
        await channel.exchange_delete(topology.dead_letter_exchange)


@pytest.fixture
async def client(
    settings: Settings, redis: Redis, amqp_cleanup: None, aiohttp_client: AiohttpClient
) -> TestClient[web.Request, web.Application]:
    """The real app (create_app), relay included, on this test's prefix and names;
    returned once RabbitMQ is connected and the topology declared."""
    # aiohttp_client comes last so that it is torn down first: the app (and its relay)
    # stops before the redis fixture deletes the test's keys, not after.
    test_client = await aiohttp_client(create_app(settings))
    await asyncio.wait_for(asyncio.shield(test_client.app[AMQP]), 10)
    return test_client


def _proxied(url: str, proxy: TcpProxy) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{proxy.port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


def _proxy_for(url: str) -> Iterator[TcpProxy]:
    parts = urlsplit(url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 0).start()
    yield proxy
    proxy.close()


@pytest.fixture
def redis_proxy(settings: Settings) -> Iterator[TcpProxy]:
    yield from _proxy_for(settings.redis_url)


@pytest.fixture
def amqp_proxy(settings: Settings) -> Iterator[TcpProxy]:
    yield from _proxy_for(settings.amqp_url)


@pytest.fixture
def postgres_proxy(settings: Settings) -> Iterator[TcpProxy]:
    yield from _proxy_for(settings.database_url)


def through(url: str, proxy: TcpProxy) -> str:
    """The same URL, pointed at the proxy."""
    return _proxied(url, proxy)


@pytest.fixture(scope="session", autouse=True)
def _local_services_only() -> None:
    for name in ("REDIS_URL", "AMQP_URL", "DATABASE_URL"):
        host = urlsplit(os.environ.get(name, "//localhost")).hostname
        assert host in (None, "localhost", "127.0.0.1", "::1"), f"{name} must point at this machine"


@pytest.fixture
def report_counts(record_property: Callable[[str, object], None]) -> Callable[..., None]:
    """Fault tests report what they counted (sent, succeeded, delivered, duplicates,
    rows); the counts are printed in a summary section at the end of the run."""

    def report(**counts: float) -> None:
        record_property("counts", {k: int(v) if v == int(v) else v for k, v in counts.items()})

    return report


def pytest_terminal_summary(terminalreporter: TerminalReporter) -> None:
    lines = []
    for report in terminalreporter.getreports("passed") + terminalreporter.getreports("failed"):
        for name, value in report.user_properties:
            if name == "counts" and report.when == "call":
                counted = " ".join(f"{k}={v}" for k, v in value.items())
                lines.append(f"{report.nodeid} [{report.outcome}]: {counted}")
    if lines:
        terminalreporter.section("fault-test counts")
        for line in lines:
            terminalreporter.write_line(line)
