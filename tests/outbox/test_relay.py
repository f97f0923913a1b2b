"""The outbox relay (docs/events.md): closes succeed while RabbitMQ is down and their
events follow when it returns; a publish never hangs on a broker that is gone; entries
a dead relay left behind are published by another."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable

import aio_pika
import orjson
import pytest
from aio_pika.abc import AbstractRobustConnection
from aiohttp.pytest_plugin import AiohttpClient
from redis.asyncio import Redis

from outbox.relay import Relay
from outbox.stream import ensure_group
from service.app import create_app
from service.appkeys import AMQP
from session_close.keys import OUTBOX_GROUP, Keys, bucket_of
from session_close.scripts import CLOSE_SESSIONS
from session_close.settings import Settings
from session_close.topology import Topology
from tests.conftest import through
from tests.support.closing import (
    BODY,
    CLOSE_PATH,
    Client,
    app_headers,
    open_session,
    outbox_entries,
    queue_depth,
)
from tests.support.delivered import outbox_length, pending_by_consumer
from tests.support.processes import settings_env
from tests.support.proxy import Mode, TcpProxy
from tests.support.waiting import wait_until

pytestmark = pytest.mark.fault

USER, TOKEN = "user-1", "token-of-user-1"


async def message_ids(amqp_url: str, queue: str) -> list[str]:
    """Take every message off the queue; their message ids, in order."""
    ids = []
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.get_queue(queue)
        while (message := await declared.get(fail=False, no_ack=True)) is not None:
            ids.append(str(message.message_id))
    return ids


async def message_bodies(amqp_url: str, queue: str) -> list[dict[str, object]]:
    """Take every message off the queue; their JSON bodies, in order."""
    bodies = []
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.get_queue(queue)
        while (message := await declared.get(fail=False, no_ack=True)) is not None:
            bodies.append(orjson.loads(message.body))
    return bodies


def users_outbox(keys: Keys) -> str:
    """The outbox of USER's bucket, where every close of these tests writes."""
    return keys.outbox(bucket_of(USER))


async def write_outbox(redis: Redis, keys: Keys, count: int, first: int = 0) -> list[str]:
    """Close `count` sessions of USER the way the API closes a batch (one script run,
    atomic, in the outbox of USER's bucket), so that a waiting relay reads them together;
    their event ids."""
    sids = [f"session-{n:04d}" for n in range(first, first + count)]
    event_ids = [str(uuid.uuid4()) for _ in sids]
    bucket = bucket_of(USER)
    script_keys: list[str] = []
    args: list[object] = [600, "2026-01-01T00:00:00.000Z"]
    for sid, event_id in zip(sids, event_ids, strict=True):
        await open_session(redis, keys, USER, sid, TOKEN)
        script_keys += [
            keys.outbox(bucket),
            keys.expiry(bucket),
            keys.session(USER, sid),
            keys.tombstone(USER, sid),
            keys.user_sessions(USER),
        ]
        args += [USER, sid, event_id, "", "", "r", ""]
    assert await CLOSE_SESSIONS(redis, script_keys, args) == ["closed"] * count
    return event_ids


@pytest.fixture
async def proxied_client(
    settings: Settings,
    redis: Redis,
    amqp_cleanup: None,
    amqp_proxy: TcpProxy,
    aiohttp_client: AiohttpClient,
) -> Client:
    """The real app, its RabbitMQ link through amqp_proxy."""
    proxied = dataclasses.replace(settings, amqp_url=through(settings.amqp_url, amqp_proxy))
    test_client: Client = await aiohttp_client(create_app(proxied))
    await asyncio.wait_for(asyncio.shield(test_client.app[AMQP]), 10)
    return test_client


@pytest.mark.parametrize("mode", ["reset", "blackhole"])
async def test_closes_succeed_while_rabbitmq_is_down_and_the_backlog_drains_after(
    proxied_client: Client,
    redis: Redis,
    keys: Keys,
    settings: Settings,
    amqp_proxy: TcpProxy,
    mode: Mode,
) -> None:
    queue = Topology.from_settings(settings).queue("audit")
    await open_session(redis, keys, USER, "session-first", TOKEN)
    await proxied_client.post(CLOSE_PATH, headers=app_headers(TOKEN, "session-first"), data=BODY)

    async def first_published() -> bool:
        return await queue_depth(settings.amqp_url, queue) == 1

    await wait_until(first_published, "the first event", within=10)

    amqp_proxy.cut(mode)
    for n in range(20):
        sid = f"session-{n:04d}"
        await open_session(redis, keys, USER, sid, TOKEN)
        started = time.monotonic()
        resp = await proxied_client.post(CLOSE_PATH, headers=app_headers(TOKEN, sid), data=BODY)
        assert resp.status == 200
        assert (await resp.json())["info"]["type"] == "success"
        assert time.monotonic() - started < 0.5
    assert await outbox_length(redis, keys) == 20
    assert await queue_depth(settings.amqp_url, queue) == 1

    amqp_proxy.restore()

    async def drained() -> bool:
        return await outbox_length(redis, keys) == 0

    await wait_until(drained, "the backlog to drain after RabbitMQ returned", within=30)
    ids = await message_ids(settings.amqp_url, queue)
    assert len(ids) == len(set(ids)) == 21


@pytest.fixture
async def proxied_exchange(
    settings: Settings, amqp_cleanup: None, amqp_proxy: TcpProxy
) -> AsyncIterator[tuple[AbstractRobustConnection, aio_pika.abc.AbstractExchange]]:
    connection = await aio_pika.connect_robust(through(settings.amqp_url, amqp_proxy))
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await Topology.from_settings(settings).declare(channel)
        yield connection, exchange


async def test_publish_gives_up_on_a_silent_broker_within_the_publish_timeout(
    redis: Redis,
    keys: Keys,
    settings: Settings,
    amqp_proxy: TcpProxy,
    proxied_exchange: tuple[AbstractRobustConnection, aio_pika.abc.AbstractExchange],
) -> None:
    failures: list[tuple[float, int]] = []
    relay = Relay(redis, settings, on_failed=lambda n: failures.append((time.monotonic(), n)))
    # The connection and channel stay open: only the publish timeout can notice.
    amqp_proxy.cut("silent")
    event_ids = await write_outbox(redis, keys, 5)
    started = time.monotonic()
    task = asyncio.create_task(relay.run(proxied_exchange[1]))
    try:

        async def gave_up() -> bool:
            return bool(failures)

        await wait_until(gave_up, "publish to give up", within=settings.publish_timeout_seconds + 3)
        gave_up_after = failures[0][0] - started
        assert settings.publish_timeout_seconds <= gave_up_after
        assert gave_up_after < settings.publish_timeout_seconds + 1
        assert failures[0][1] == 5
        assert await outbox_length(redis, keys) == 5  # kept for a later attempt
    finally:
        stopping = time.monotonic()
        await relay.stop(task)
        assert time.monotonic() - stopping < settings.publish_timeout_seconds + 2
    queue = Topology.from_settings(settings).queue("audit")
    assert await message_ids(settings.amqp_url, queue) == []
    # Nothing was confirmed, so nothing was deleted: the very entries wait for a retry.
    assert sorted(e["event_id"] for e in await outbox_entries(redis, keys)) == sorted(event_ids)


async def test_entries_of_a_killed_relay_are_published_by_another_within_10_s(
    redis: Redis,
    keys: Keys,
    settings: Settings,
    amqp_cleanup: None,
    amqp_proxy: TcpProxy,
    report_counts: Callable[..., None],
) -> None:
    """With the default heartbeat: the contract's bound is from the relay's death."""
    env = settings_env(
        settings, AMQP_URL=through(settings.amqp_url, amqp_proxy), LOG_LEVEL="WARNING"
    )
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "outbox", "relay", env=env)
    try:

        async def relay_reading() -> bool:
            with contextlib.suppress(Exception):
                return bool(await redis.xinfo_consumers(users_outbox(keys), OUTBOX_GROUP))
            return False

        await wait_until(relay_reading, "the relay process to start reading", within=20)
        # The broker goes silent: the relay reads the entries and can never get confirms.
        amqp_proxy.cut("blackhole")
        event_ids = await write_outbox(redis, keys, 10)

        async def all_in_flight() -> bool:
            return sum((await pending_by_consumer(redis, keys)).values()) == 10

        await wait_until(all_in_flight, "the relay process to take the entries", within=10)
        (dead_consumer,) = (await pending_by_consumer(redis, keys)).keys()
        process.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        assert await asyncio.wait_for(process.wait(), 10) == -signal.SIGKILL
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    amqp_proxy.restore()
    assert await outbox_length(redis, keys) == 10

    connection = await aio_pika.connect_robust(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(settings.amqp_exchange)
        relay = Relay(redis, settings)
        task = asyncio.create_task(relay.run(exchange))
        try:

            async def drained() -> bool:
                return await outbox_length(redis, keys) == 0

            await wait_until(
                drained, "another relay to publish the dead relay's entries", within=30
            )
            takeover = time.monotonic() - killed
        finally:
            await relay.stop(task)
    assert dead_consumer not in await pending_by_consumer(redis, keys)
    queue = Topology.from_settings(settings).queue("audit")
    ids = await message_ids(settings.amqp_url, queue)
    report_counts(held_by_killed_relay=10, delivered=len(ids), takeover_seconds=round(takeover, 2))
    assert sorted(ids) == sorted(event_ids)
    assert takeover <= 10


async def test_an_idle_relay_does_not_time_out_on_redis(
    redis: Redis,
    keys: Keys,
    settings: Settings,
    amqp_cleanup: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Its blocking read must end inside the client's socket timeout; it used not to."""
    from session_close.redis_client import connect_redis

    caplog.set_level(logging.WARNING, logger="outbox.relay")
    relay_redis = connect_redis(settings)
    connection = await aio_pika.connect_robust(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await Topology.from_settings(settings).declare(channel)
        relay = Relay(relay_redis, settings)
        task = asyncio.create_task(relay.run(exchange))
        # Idle for a few of the client's socket timeouts: nothing may go wrong meanwhile.
        done, _ = await asyncio.wait([task], timeout=3 * settings.redis_timeout_seconds)
        assert not done
        await relay.stop(task)
    await relay_redis.aclose()
    assert [r.getMessage() for r in caplog.records if r.name == "outbox.relay"] == []


@pytest.mark.parametrize("mode", ["reset", "blackhole"])
async def test_the_relay_starts_even_when_the_broker_drops_right_after_the_topology(
    proxied_client: Client,
    redis: Redis,
    keys: Keys,
    settings: Settings,
    amqp_proxy: TcpProxy,
    mode: Mode,
) -> None:
    # The relay opens its channel just after the API declared the topology: cut there.
    amqp_proxy.cut(mode)
    for n in range(5):
        sid = f"session-{n:04d}"
        await open_session(redis, keys, USER, sid, TOKEN)
        resp = await proxied_client.post(CLOSE_PATH, headers=app_headers(TOKEN, sid), data=BODY)
        assert (await resp.json())["info"]["type"] == "success"
    amqp_proxy.restore()

    async def drained() -> bool:
        return await outbox_length(redis, keys) == 0

    await wait_until(drained, "the backlog to drain after RabbitMQ returned", within=30)
    queue = Topology.from_settings(settings).queue("audit")
    assert len(await message_ids(settings.amqp_url, queue)) == 5


async def test_the_api_keeps_declaring_the_topology_until_it_succeeds(
    settings: Settings,
    redis: Redis,
    keys: Keys,
    amqp_cleanup: None,
    aiohttp_client: AiohttpClient,
) -> None:
    """A declaration that fails (here an exchange someone declared with another type; in
    production, the broker dropping halfway through) is retried, not given up for good."""
    topology = Topology.from_settings(settings)
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_exchange(topology.exchange, aio_pika.ExchangeType.DIRECT)
        test_client = await aiohttp_client(create_app(settings))

        async def serving() -> bool:
            return await redis.exists(users_outbox(keys)) == 1  # the app is serving

        await wait_until(serving, "the app to start", within=10)
        await open_session(redis, keys, USER, "session-0001", TOKEN)
        resp = await test_client.post(
            CLOSE_PATH, headers=app_headers(TOKEN, "session-0001"), data=BODY
        )
        assert (await resp.json())["info"]["type"] == "success"
        assert not test_client.app[AMQP].done()  # still trying, not given up
        channel = await connection.channel()
        await channel.exchange_delete(topology.exchange)

    await asyncio.wait_for(asyncio.shield(test_client.app[AMQP]), 15)

    async def drained() -> bool:
        return await outbox_length(redis, keys) == 0

    await wait_until(drained, "the event once the topology could be declared", within=15)
    assert len(await message_ids(settings.amqp_url, topology.queue("audit"))) == 1


async def test_an_event_no_queue_takes_stays_in_the_outbox(
    redis: Redis, keys: Keys, settings: Settings, amqp_cleanup: None
) -> None:
    """A publish the broker returns as unroutable is confirmed all the same; the relay
    must keep the entry rather than delete an event that reached no queue."""
    await write_outbox(redis, keys, 3)
    failures: list[int] = []
    connection = await aio_pika.connect_robust(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        # The exchange alone: no worker queue is bound to it.
        exchange = await channel.declare_exchange(
            settings.amqp_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        relay = Relay(redis, settings, on_failed=failures.append)
        task = asyncio.create_task(relay.run(exchange))
        try:

            async def tried() -> bool:
                return sum(failures) >= 3

            await wait_until(tried, "the relay to try the entries", within=10)
        finally:
            await relay.stop(task)
    assert await outbox_length(redis, keys) == 3


async def test_a_dead_relays_name_leaves_the_group_only_once_all_its_entries_are_taken_over(
    redis: Redis, keys: Keys, settings: Settings, amqp_cleanup: None
) -> None:
    """It holds more entries than a relay claims at once: the name stays (holding the
    rest) until the last is claimed, since removing it would drop the rest for good."""
    await ensure_group(redis, keys)
    event_ids = await write_outbox(redis, keys, 5)
    # A relay that read the entries, then died: its name holds them, pending.
    await redis.xreadgroup(OUTBOX_GROUP, "dead-relay", {users_outbox(keys): ">"}, count=10)
    connection = await aio_pika.connect_robust(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await Topology.from_settings(settings).declare(channel)
        relay = Relay(redis, dataclasses.replace(settings, relay_batch_size=2))
        task = asyncio.create_task(relay.run(exchange))
        try:

            async def drained() -> bool:
                return await outbox_length(redis, keys) == 0

            await wait_until(drained, "the dead relay's entries to be published", within=15)
        finally:
            await relay.stop(task)
    names = [c["name"] for c in await redis.xinfo_consumers(users_outbox(keys), OUTBOX_GROUP)]
    assert len(names) == 1
    assert names[0] != "dead-relay"
    queue = Topology.from_settings(settings).queue("audit")
    assert sorted(await message_ids(settings.amqp_url, queue)) == sorted(event_ids)


async def test_a_live_relays_entries_are_left_to_it(
    redis: Redis, keys: Keys, settings: Settings, amqp_cleanup: None
) -> None:
    """A relay whose heartbeat is fresh (say, waiting for the broker) keeps its entries:
    taking them would only publish them twice."""
    await ensure_group(redis, keys)
    await write_outbox(redis, keys, 2)
    await redis.xreadgroup(OUTBOX_GROUP, "live-relay", {users_outbox(keys): ">"}, count=10)
    await redis.set(keys.relay_heartbeat("live-relay"), "1", ex=60)
    connection = await aio_pika.connect_robust(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await Topology.from_settings(settings).declare(channel)
        relay = Relay(redis, settings)
        task = asyncio.create_task(relay.run(exchange))
        try:
            # Each read comes after a look for dead relays: once a later entry is
            # published, the relay has looked at least once.
            await write_outbox(redis, keys, 1, first=2)

            async def later_entry_published() -> bool:
                return await outbox_length(redis, keys) == 2

            await wait_until(later_entry_published, "the later entry to be published", within=15)
        finally:
            await relay.stop(task)
    assert await pending_by_consumer(redis, keys) == {"live-relay": 2}
