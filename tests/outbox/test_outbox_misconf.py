"""The relay and the sweeper against a Redis that cannot persist (MISCONF): an outage,
waited out with backoff and logged as one (a warning, no traceback), after which the
work done is what it would have been. On a redis-server of the test's own."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import pytest
from redis.asyncio import Redis

from outbox.relay import Relay
from outbox.stream import ensure_group
from outbox.sweeper import Sweeper
from session_close.keys import Keys, bucket_of
from session_close.scripts import CLOSE_SESSIONS
from session_close.settings import Settings
from session_close.topology import Topology
from tests.support.closing import open_session
from tests.support.delivered import outbox_length
from tests.support.processes import redis_server
from tests.support.redis_states import WRITABLE_DIR, cannot_persist, persists_again
from tests.support.waiting import wait_until

OUTAGE_LINES = 3  # warnings seen while it lasts: it was retried, and said so each time


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[Redis]:
    with redis_server(tmp_path, *WRITABLE_DIR) as url:
        redis = Redis.from_url(url, decode_responses=True)
        try:
            yield redis
        finally:
            await redis.aclose()


def lines(caplog: pytest.LogCaptureFixture, logger: str, message: str) -> int:
    return sum(1 for r in caplog.records if r.name == logger and r.getMessage() == message)


def errors(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno >= 40]


async def test_the_sweeper_waits_out_a_redis_that_cannot_persist_and_sweeps_after(
    own_redis: Redis,
    keys: Keys,
    settings: Settings,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    redis = own_redis
    expires_at = time.time() - 1
    await redis.hset(
        keys.session("u1", "sid-misconf-1"), mapping={"user_id": "u1", "expires_at": expires_at}
    )
    await redis.zadd(keys.expiry(bucket_of("u1")), {"sid-misconf-1": expires_at})
    await cannot_persist(redis, tmp_path)
    caplog.set_level(logging.WARNING, logger="outbox.sweeper")
    sweeper = Sweeper(redis, dataclasses.replace(settings, sweep_interval_seconds=0.1))
    task = asyncio.create_task(sweeper.run())
    try:
        outage = "expiry sweeper: Redis unavailable"
        await wait_until(
            lambda: lines(caplog, "outbox.sweeper", outage) >= OUTAGE_LINES, "outage lines"
        )
        assert await outbox_length(redis, keys) == 0
        await persists_again(redis, tmp_path)

        async def swept() -> bool:
            return await outbox_length(redis, keys) == 1

        await wait_until(swept, "the session.expired entry once Redis persists", within=30)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert errors(caplog, "outbox.sweeper") == []


async def test_the_relay_waits_out_a_redis_that_cannot_persist_and_publishes_after(
    own_redis: Redis,
    keys: Keys,
    settings: Settings,
    amqp_cleanup: None,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    redis = own_redis
    await ensure_group(redis, keys)
    await open_session(redis, keys, "u1", "session-misconf-1", "token-misconf")
    sid, bucket = "session-misconf-1", bucket_of("u1")
    script_keys = [
        keys.outbox(bucket),
        keys.expiry(bucket),
        keys.session("u1", sid),
        keys.tombstone("u1", sid),
        keys.user_sessions("u1"),
    ]
    args = [600, "2026-01-01T00:00:00.000Z"]
    args += ["u1", sid, "7c8e6a3e-0d1f-4a61-9f0e-5b2d3c4a5e6f", "", "", "r", ""]
    assert await CLOSE_SESSIONS(redis, script_keys, args) == ["closed"]
    await cannot_persist(redis, tmp_path)
    caplog.set_level(logging.WARNING, logger="outbox.relay")
    connection = await aio_pika.connect_robust(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await Topology.from_settings(settings).declare(channel)
        relay = Relay(redis, settings)
        task = asyncio.create_task(relay.run(exchange))
        try:
            outage = "outbox relay: Redis unavailable"
            await wait_until(
                lambda: lines(caplog, "outbox.relay", outage) >= OUTAGE_LINES,
                "outage lines",
                within=30,
            )
            await persists_again(redis, tmp_path)

            async def drained() -> bool:
                return await outbox_length(redis, keys) == 0

            await wait_until(drained, "the entry published once Redis persists", within=30)
        finally:
            await relay.stop(task)
    assert errors(caplog, "outbox.relay") == []
