"""A Redis that answers but refuses writes: it cannot persist (MISCONF) or it is full
(OOM). Closes and close-alls answer 503 with Retry-After, never 500, while it lasts;
/readyz says so; /metrics still answers. On a redis-server of the test's own."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.pytest_plugin import AiohttpClient
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from outbox.stream import backlog
from service.app import create_app
from session_close.keys import Keys
from session_close.settings import Settings
from tests.support.closing import BODY, CLOSE_PATH, Client, app_headers, open_session
from tests.support.processes import redis_server
from tests.support.redis_states import WRITABLE_DIR, cannot_persist, full, persists_again

CLOSE_ALL_PATH = "/v1.0/session/close-all"
USER, TOKEN = "user-misconf", "token-of-user-misconf"


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[tuple[Redis, str]]:
    with redis_server(tmp_path, *WRITABLE_DIR) as url:
        redis = Redis.from_url(url, decode_responses=True)
        try:
            yield redis, url
        finally:
            await redis.aclose()


@pytest.fixture
async def own_client(
    aiohttp_client: AiohttpClient,
    settings: Settings,
    amqp_cleanup: None,
    own_redis: tuple[Redis, str],
) -> AsyncIterator[Client]:
    own = dataclasses.replace(
        settings, redis_url=own_redis[1], relay_enabled=False, sweeper_enabled=False
    )
    client: Client = await aiohttp_client(create_app(own))
    yield client
    await client.close()


async def close(client: Client, sid: str) -> tuple[int, dict[str, str], str]:
    resp = await client.post(CLOSE_PATH, headers=app_headers(TOKEN, sid), data=BODY)
    return resp.status, dict(resp.headers), (await resp.json())["info"]["type"]


async def close_all(client: Client) -> tuple[int, dict[str, str], str]:
    headers = app_headers(TOKEN, "")
    del headers["Sessionid"]
    resp = await client.post(CLOSE_ALL_PATH, headers=headers, data=b'{"requestContent": {}}')
    return resp.status, dict(resp.headers), (await resp.json())["info"]["type"]


async def redis_gauges(client: Client) -> dict[str, float]:
    resp = await client.get("/metrics")
    assert resp.status == 200
    return {
        s.name: s.value
        for family in text_string_to_metric_families(await resp.text())
        for s in family.samples
        if s.name in ("redis_up", "redis_writes_up")
    }


async def test_closes_answer_503_while_redis_cannot_persist_and_succeed_once_it_can(
    own_client: Client, own_redis: tuple[Redis, str], keys: Keys, tmp_path: Path
) -> None:
    redis, _ = own_redis
    await open_session(redis, keys, USER, "session-misconf-1", TOKEN)
    await open_session(redis, keys, USER, "session-misconf-2", TOKEN)
    await cannot_persist(redis, tmp_path)

    for status, headers, info_type in (
        await close(own_client, "session-misconf-1"),
        await close_all(own_client),
    ):
        assert (status, info_type) == (503, "error")
        assert headers["Retry-After"] == "1"
    assert await redis.exists(keys.session(USER, "session-misconf-1")) == 1
    ready = await own_client.get("/readyz")
    assert ready.status == 503
    body = await ready.json()
    assert (body["redis"], body["redisWrites"]) == ("up", "down")
    assert await redis_gauges(own_client) == {"redis_up": 1, "redis_writes_up": 0}

    await persists_again(redis, tmp_path)
    assert (await close(own_client, "session-misconf-1"))[::2] == (200, "success")
    assert (await close_all(own_client))[::2] == (200, "success")
    assert await backlog(redis, keys) == 2
    ready = await own_client.get("/readyz")
    assert ready.status == 200
    assert (await ready.json())["redisWrites"] == "up"


async def test_a_full_redis_never_gives_500_and_readiness_follows_the_closes(
    own_client: Client, own_redis: tuple[Redis, str], keys: Keys
) -> None:
    """OOM refuses a script whose first write needs memory. A close's first write is a
    DEL, which frees memory, so Redis lets it finish: closes keep succeeding while Redis
    is full, and /readyz, whose write check is a DEL too, stays ready."""
    redis, _ = own_redis
    await open_session(redis, keys, USER, "session-oom-1", TOKEN)
    await open_session(redis, keys, USER, "session-oom-2", TOKEN)
    await full(redis)
    assert (await close(own_client, "session-oom-1"))[::2] == (200, "success")
    assert (await close_all(own_client))[::2] == (200, "success")
    assert await backlog(redis, keys) == 2
    ready = await own_client.get("/readyz")
    assert ready.status == 200
    assert (await ready.json())["redisWrites"] == "up"


async def test_a_scrape_answers_200_when_redis_answers_errors(
    own_client: Client, own_redis: tuple[Redis, str], keys: Keys
) -> None:
    """The outbox key of the wrong type: every read of it is an error reply."""
    redis, _ = own_redis
    await redis.set(keys.outbox(0), "not a stream")
    assert await redis_gauges(own_client) == {"redis_up": 0, "redis_writes_up": 1}
    ready = await own_client.get("/readyz")
    assert ready.status == 503
