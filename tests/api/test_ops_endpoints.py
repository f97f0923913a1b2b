"""/healthz, /readyz and /metrics on the real app (create_app), against the real Redis and
RabbitMQ, with faults injected through the TCP proxies."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.pytest_plugin import AiohttpClient
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from service.app import create_app
from service.appkeys import AMQP, METRICS
from session_close.cli import create_session, create_token
from session_close.keys import Keys
from session_close.settings import Settings
from tests.conftest import through
from tests.support.processes import redis_server
from tests.support.proxy import TcpProxy
from tests.support.waiting import wait_until

Client = TestClient[web.Request, web.Application]

CLOSE = "/v1.0/session/close"


def close_headers(token: str, session_id: str) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "SessionID": session_id,
        "Authorization": f"Basic {token}",
    }


async def started(aiohttp_client: AiohttpClient, settings: Settings) -> Client:
    client = await aiohttp_client(create_app(settings))
    await asyncio.wait_for(asyncio.shield(client.app[AMQP]), 10)
    return client


async def samples(client: Client) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(await resp.text())
        for s in family.samples
    }


def sample(
    values: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float | None:
    return values.get((name, frozenset(labels.items())))


async def test_healthz_says_alive(client: Client) -> None:
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert (await resp.json())["info"] == {
        "type": "success",
        "title": "Alive",
        "message": "The process is running.",
        "sessionId": "",
    }
    assert resp.headers["X-Request-ID"]


async def test_readyz_ready_reports_redis_rabbitmq_and_backlog(client: Client) -> None:
    resp = await client.get("/readyz")
    assert resp.status == 200
    body = await resp.json()
    assert (body["info"]["type"], body["info"]["title"]) == ("success", "Ready")
    assert (body["redis"], body["rabbitmq"], body["outboxBacklog"]) == ("up", "up", 0)
    values = await samples(client)
    assert sample(values, "redis_up") == 1
    assert sample(values, "rabbitmq_up") == 1


async def test_readyz_503_when_redis_is_cut_and_ready_again_after(
    aiohttp_client: AiohttpClient,
    settings: Settings,
    redis: Redis,
    amqp_cleanup: None,
    redis_proxy: TcpProxy,
) -> None:
    client = await started(
        aiohttp_client,
        dataclasses.replace(settings, redis_url=through(settings.redis_url, redis_proxy)),
    )
    assert (await client.get("/readyz")).status == 200

    redis_proxy.cut("reset")
    resp = await client.get("/readyz")
    assert resp.status == 503
    body = await resp.json()
    assert (body["info"]["type"], body["info"]["title"]) == ("error", "Not ready")
    assert (body["redis"], body["rabbitmq"]) == ("down", "up")
    assert resp.headers["Content-Type"].startswith("application/json")
    assert sample(await samples(client), "redis_up") == 0

    redis_proxy.restore()

    async def ready() -> bool:
        return (await client.get("/readyz")).status == 200

    await wait_until(ready, "ready again once Redis is back")


async def test_readyz_503_when_redis_hangs(
    aiohttp_client: AiohttpClient,
    settings: Settings,
    redis: Redis,
    amqp_cleanup: None,
    redis_proxy: TcpProxy,
) -> None:
    client = await started(
        aiohttp_client,
        dataclasses.replace(
            settings,
            redis_url=through(settings.redis_url, redis_proxy),
            redis_timeout_seconds=0.3,
        ),
    )
    redis_proxy.cut("blackhole")
    try:
        begun = time.monotonic()
        resp = await client.get("/readyz")
        assert resp.status == 503
        # bounded by REDIS_TIMEOUT_SECONDS (and one reconnect), not by the client's
        # timeout (5 minutes); generous for a busy 2-core machine
        assert time.monotonic() - begun < 10
    finally:
        redis_proxy.restore()


async def test_readyz_stays_ready_while_rabbitmq_is_unreachable_and_reports_it(
    aiohttp_client: AiohttpClient,
    settings: Settings,
    redis: Redis,
    keys: Keys,
    amqp_proxy: TcpProxy,
) -> None:
    amqp_proxy.cut("reset")
    app = create_app(dataclasses.replace(settings, amqp_url=through(settings.amqp_url, amqp_proxy)))
    client = await aiohttp_client(app)
    await create_token(redis, keys, "u-rmq", "token-rmq", 60)
    await create_session(redis, keys, "u-rmq", "session-rmq-1", ttl=60)
    closed = await client.post(
        CLOSE, headers=close_headers("token-rmq", "session-rmq-1"), json={"requestContent": {}}
    )
    assert closed.status == 200  # the reason readiness must not depend on the broker

    resp = await client.get("/readyz")
    assert resp.status == 200
    body = await resp.json()
    assert body["info"]["title"] == "Ready"
    assert (body["redis"], body["rabbitmq"], body["outboxBacklog"]) == ("up", "down", 1)
    values = await samples(client)
    assert sample(values, "rabbitmq_up") == 0
    assert sample(values, "outbox_backlog") == 1


async def test_readyz_stays_ready_with_a_large_outbox_backlog_and_reports_it(
    aiohttp_client: AiohttpClient,
    settings: Settings,
    redis: Redis,
    keys: Keys,
    amqp_cleanup: None,
) -> None:
    # No relay, so nothing drains the outbox while the test fills it.
    client = await started(aiohttp_client, dataclasses.replace(settings, relay_enabled=False))
    backlog = 20_000  # over the 10,000 that used to make the API unready
    async with redis.pipeline(transaction=False) as pipe:
        for n in range(backlog):
            pipe.xadd(keys.outbox(0), {"n": str(n)})
        await pipe.execute()
    resp = await client.get("/readyz")
    assert resp.status == 200
    body = await resp.json()
    assert (body["info"]["type"], body["outboxBacklog"]) == ("success", backlog)
    assert sample(await samples(client), "outbox_backlog") == backlog


async def test_metrics_count_requests_by_route_and_status_and_closes_by_outcome(
    aiohttp_client: AiohttpClient,
    settings: Settings,
    redis: Redis,
    keys: Keys,
    amqp_cleanup: None,
) -> None:
    client = await started(aiohttp_client, dataclasses.replace(settings, relay_enabled=False))
    await create_token(redis, keys, "u1", "token-ops-1", 60)
    await create_session(redis, keys, "u1", "session-ops-1", ttl=60)

    ok = await client.post(CLOSE, headers=close_headers("token-ops-1", "session-ops-1"), data="{}")
    assert ok.status == 400  # no requestContent
    for _ in range(2):
        resp = await client.post(
            CLOSE,
            headers=close_headers("token-ops-1", "session-ops-1"),
            json={"requestContent": {}},
        )
        assert resp.status == 200
    unknown = await client.post(
        CLOSE, headers=close_headers("no-such-token", "session-ops-1"), json={"requestContent": {}}
    )
    assert unknown.status == 401
    assert (await client.get("/no/such/path")).status == 404
    assert (await client.get("/healthz")).status == 200

    values = await samples(client)
    post = {"route": CLOSE, "method": "POST"}
    assert sample(values, "http_requests_total", **post, status="200") == 2
    assert sample(values, "http_requests_total", **post, status="400") == 1
    assert sample(values, "http_requests_total", **post, status="401") == 1
    assert sample(values, "http_requests_total", route="unmatched", method="GET", status="404") == 1
    assert sample(values, "http_requests_total", route="/healthz", method="GET", status="200") == 1
    assert sample(values, "http_request_duration_seconds_count", **post) == 4
    seconds = sample(values, "http_request_duration_seconds_sum", **post)
    assert seconds is not None
    assert 0 < seconds < 4
    assert sample(values, "session_closes_total", outcome="closed") == 1
    assert sample(values, "session_closes_total", outcome="already") == 1
    assert sample(values, "session_closes_total", outcome="token") == 1
    assert sample(values, "session_closes_total", outcome="missing") == 0
    # the one successful close left its event in the outbox (no relay here)
    assert sample(values, "outbox_backlog") == 1
    assert sample(values, "outbox_relay_publish_failures_total") == 0


async def test_metrics_count_relay_publishes(client: Client, redis: Redis, keys: Keys) -> None:
    await create_token(redis, keys, "u2", "token-ops-2", 60)
    await create_session(redis, keys, "u2", "session-ops-2", ttl=60)
    resp = await client.post(
        CLOSE, headers=close_headers("token-ops-2", "session-ops-2"), json={"requestContent": {}}
    )
    assert resp.status == 200

    async def published() -> bool:
        values = await samples(client)
        return sample(values, "outbox_relay_published_total") == 1 and (
            sample(values, "outbox_backlog") == 0
        )

    await wait_until(published, "the event published and the backlog empty")


async def test_metrics_count_relay_publish_failures(
    aiohttp_client: AiohttpClient,
    settings: Settings,
    redis: Redis,
    keys: Keys,
    amqp_cleanup: None,
    amqp_proxy: TcpProxy,
) -> None:
    client = await started(
        aiohttp_client,
        dataclasses.replace(settings, amqp_url=through(settings.amqp_url, amqp_proxy)),
    )
    await create_token(redis, keys, "u3", "token-ops-3", 60)
    for sid in ("session-ops-3a", "session-ops-3b"):
        await create_session(redis, keys, "u3", sid, ttl=60)

    async def close(sid: str) -> None:
        resp = await client.post(
            CLOSE, headers=close_headers("token-ops-3", sid), json={"requestContent": {}}
        )
        assert resp.status == 200

    async def published() -> bool:
        return sample(await samples(client), "outbox_relay_published_total") == 1

    # First the relay is up and publishing...
    await close("session-ops-3a")
    await wait_until(published, "the first event published")
    # ...then the broker drops the link and hangs: no publish can be confirmed.
    amqp_proxy.cut("blackhole")
    try:
        await close("session-ops-3b")

        async def failed() -> bool:
            failures = sample(await samples(client), "outbox_relay_publish_failures_total")
            return failures is not None and failures >= 1

        await wait_until(failed, "a publish failure counted")
        assert sample(await samples(client), "outbox_backlog") == 1  # kept for a retry
    finally:
        amqp_proxy.restore()


async def test_each_app_has_its_own_metrics(settings: Settings) -> None:
    first, second = create_app(settings), create_app(settings)
    assert first[METRICS].registry is not second[METRICS].registry
    first[METRICS].observe_request("/healthz", "GET", 200, 0.001)
    assert (
        second[METRICS].registry.get_sample_value(
            "http_requests_total", {"route": "/healthz", "method": "GET", "status": "200"}
        )
        is None
    )


UNDURABLE = "Redis may lose outbox events and tombstones"


@pytest.mark.parametrize(
    ("options", "warned"),
    [
        (
            ("--appendonly", "no", "--maxmemory-policy", "allkeys-lru"),
            {"appendonly", "maxmemory-policy"},
        ),
        (("--appendonly", "yes", "--appendfsync", "no"), {"appendfsync"}),
        (
            (
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--maxmemory-policy",
                "noeviction",
            ),
            None,
        ),
        (("--appendonly", "no", "--rename-command", "CONFIG", '""'), None),
    ],
    ids=["appendonly-no", "appendfsync-no", "durable", "config-disabled"],
)
async def test_the_api_warns_at_start_when_redis_is_not_durable(
    aiohttp_client: AiohttpClient,
    settings: Settings,
    amqp_cleanup: None,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    options: tuple[str, ...],
    warned: set[str] | None,
) -> None:
    options = tuple("" if o == '""' else o for o in options)
    with redis_server(tmp_path, *options) as url:
        client = await started(aiohttp_client, dataclasses.replace(settings, redis_url=url))
        assert (await client.get("/readyz")).status == 200  # started, and serves
        warnings = [r for r in caplog.records if r.getMessage() == UNDURABLE]
        if warned is None:
            assert warnings == []
        else:
            (warning,) = warnings
            assert warning.levelno == logging.WARNING
            assert set(warning.__dict__["redis_config"]) == warned
        await client.close()


@pytest.mark.fault
async def test_a_hanging_redis_gives_503s_from_a_bounded_number_of_connections(
    aiohttp_client: AiohttpClient,
    settings: Settings,
    redis: Redis,
    keys: Keys,
    amqp_cleanup: None,
    redis_proxy: TcpProxy,
    report_counts: Callable[..., None],
) -> None:
    in_flight, timeout, closes = 2, 2.0, 12
    client = await started(
        aiohttp_client,
        dataclasses.replace(
            settings,
            redis_url=through(settings.redis_url, redis_proxy),
            redis_timeout_seconds=timeout,
            redis_max_connections=in_flight + 2,
            close_batches_in_flight=in_flight,
            relay_enabled=False,
        ),
    )
    await create_token(redis, keys, "u-pool", "token-pool", 60)
    redis_proxy.cut("blackhole")  # every existing connection dropped; new ones hang
    try:
        begun = time.monotonic()

        async def close(n: int) -> int:
            resp = await client.post(
                CLOSE,
                headers=close_headers("token-pool", f"session-pool-{n}"),
                json={"requestContent": {}},
            )
            assert (await resp.json())["info"]["type"] == "error"
            return resp.status

        runner = client.server.runner
        assert runner is not None
        server = runner.server
        assert server is not None
        tasks = []
        for n in range(closes):
            arrived = server.requests_count + 1
            tasks.append(asyncio.create_task(close(n)))
            # each close reaches the app before the next is sent, so that uncapped each
            # would be a batch of its own, on a connection of its own
            await wait_until(lambda: server.requests_count >= arrived, "the close to arrive")  # noqa: B023
        opened_by_closes = redis_proxy.open_connections
        ready = await client.get("/readyz")
        statuses = await asyncio.gather(*tasks)
        elapsed = time.monotonic() - begun
    finally:
        redis_proxy.restore()
    report_counts(closes=closes, unavailable_503=statuses.count(503), connections=opened_by_closes)
    assert statuses.count(503) == closes
    assert opened_by_closes <= in_flight
    assert ready.status == 503  # it answers, saying Redis is down, not a pool error's 500
    assert (await ready.json())["redis"] == "down"
    assert elapsed < closes * timeout  # bounded, not one Redis timeout after another
