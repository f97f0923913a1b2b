"""The relays' heartbeats (docs/events.md): a live relay is never taken over, not even
while it drains a large outbox beside another; a stopped relay's heartbeat is gone at
once; and a Redis that is full (maxmemory reached) still takes the refresh."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator

import aio_pika
import pytest
from aio_pika.abc import AbstractExchange
from redis.asyncio import Redis
from redis.exceptions import OutOfMemoryError, RedisError

from outbox.relay import Relay
from outbox.stream import ensure_group
from session_close.keys import Keys
from session_close.redis_client import connect_redis
from session_close.settings import Settings
from session_close.topology import Topology
from tests.support.delivered import closed_entry, outbox_length, take_messages, write_entries
from tests.support.processes import free_port
from tests.support.waiting import wait_until

pytestmark = pytest.mark.fault

HEARTBEAT = 2.0
# Entries keep arriving for this long, so the relays work beside each other for several
# heartbeat TTLs however fast the machine drains (an idle one drained 20,000 entries
# written up front in 2.6 s, a loaded one in 14 s).
FEED_SECONDS = 5 * HEARTBEAT
CHUNK, CHUNKS = 1_000, 20
ENTRIES = CHUNK * CHUNKS


@pytest.fixture
async def exchange(settings: Settings, amqp_cleanup: None) -> AsyncIterator[AbstractExchange]:
    connection = await aio_pika.connect_robust(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        yield await Topology.from_settings(settings).declare(channel)


async def heartbeats(redis: Redis, keys: Keys) -> list[str]:
    return [k async for k in redis.scan_iter(match=f"{keys.relay_heartbeat('')}*")]


async def test_two_live_relays_draining_a_large_outbox_never_take_each_other_over(
    settings: Settings,
    redis: Redis,
    keys: Keys,
    amqp_cleanup: None,
    report_counts: Callable[..., None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each relay publishes what it read, once: a takeover of a live relay would publish
    its entries in flight a second time. No fault here and no publish failing (a long
    publish timeout, so that a slow confirm on a loaded machine is no failure either):
    any repeat would be a takeover, so exactly 0 repeats."""
    caplog.set_level(logging.INFO, logger="outbox.relay")
    fast = dataclasses.replace(
        settings, relay_heartbeat_seconds=HEARTBEAT, publish_timeout_seconds=30.0
    )
    await ensure_group(redis, keys)
    published = [0, 0]
    alive: list[int] = []
    failed: list[int] = []
    connection = await aio_pika.connect_robust(settings.amqp_url)
    async with connection:
        relays, tasks, clients = [], [], []
        for n in range(2):
            channel = await connection.channel(publisher_confirms=True)
            exchange = await Topology.from_settings(settings).declare(channel)
            client = connect_redis(fast, resend=False)  # as the relay's own

            def count(k: int, n: int = n) -> None:
                published[n] += k

            relay = Relay(client, fast, on_published=count, on_failed=failed.append)
            relays.append(relay)
            clients.append(client)
            tasks.append(asyncio.create_task(relay.run(exchange)))
        started = time.monotonic()
        try:
            for chunk in range(CHUNKS):
                first = chunk * CHUNK
                await write_entries(
                    redis, keys, [closed_entry(n) for n in range(first, first + CHUNK)]
                )
                await asyncio.sleep(FEED_SECONDS / CHUNKS)  # a steady feed, not a wait
                # What the other relay goes by: both still look alive, TTL after TTL.
                alive.append(len(await heartbeats(redis, keys)))

            async def drained() -> bool:
                return await outbox_length(redis, keys) == 0

            await wait_until(drained, "the two relays to drain the outbox", within=180)
            took = time.monotonic() - started
        finally:
            for relay, task in zip(relays, tasks, strict=True):
                await relay.stop(task)
            for client in clients:
                await client.aclose()
    queue = Topology.from_settings(settings).queue("audit")
    ids = [m["messageId"] for m in await take_messages(settings.amqp_url, queue, within=120)]
    takeovers = [r for r in caplog.records if r.getMessage().startswith("outbox relay took over")]
    report_counts(
        entries=ENTRIES,
        delivered=len(ids),
        duplicates=len(ids) - len(set(ids)),
        takeovers=len(takeovers),
        publish_failures=sum(failed),
        by_first_relay=published[0],
        by_second_relay=published[1],
        drain_seconds=round(took, 1),
        heartbeat_ttls=round(took / HEARTBEAT, 1),
    )
    assert min(published) > 0, "both relays drained the outbox"
    assert alive == [2] * CHUNKS, "each relay's heartbeat outlived its TTL while it worked"
    assert took > 3 * HEARTBEAT, "the drain outlasted a few heartbeat TTLs"
    assert sum(failed) == 0
    assert takeovers == []
    assert len(ids) == len(set(ids)) == ENTRIES


async def test_a_stopped_relays_heartbeat_is_gone_at_once(
    settings: Settings, redis: Redis, keys: Keys, exchange: AbstractExchange
) -> None:
    """So that what it still holds is taken over at once, not after the TTL."""
    relay = Relay(redis, settings)
    task = asyncio.create_task(relay.run(exchange))
    try:

        async def beating() -> bool:
            return len(await heartbeats(redis, keys)) == 1

        await wait_until(beating, "the relay's heartbeat", within=10)
    finally:
        await relay.stop(task)
    assert await heartbeats(redis, keys) == []


@pytest.fixture
def full_redis_url() -> Iterator[str]:
    """A Redis of its own, with a memory limit and no eviction, stopped afterwards."""
    port = free_port()
    process = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--maxmemory-policy",
            "noeviction",
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)


async def fill(redis: Redis) -> None:
    """Make Redis full: a limit well under what it holds, so that it refuses every write
    that needs memory (OOM), whatever small buffers come and go meanwhile."""
    await redis.set("filler", "x" * 4_000_000)
    used = int((await redis.info("memory"))["used_memory"])
    await redis.config_set("maxmemory", used // 2)
    with pytest.raises(OutOfMemoryError):
        await redis.set("one-more", "x")


async def test_a_full_redis_still_takes_a_live_relays_heartbeat(
    settings: Settings, full_redis_url: str, exchange: AbstractExchange
) -> None:
    full = dataclasses.replace(
        settings, redis_url=full_redis_url, relay_heartbeat_seconds=HEARTBEAT
    )
    keys = Keys(full.redis_key_prefix)
    redis = Redis.from_url(full_redis_url, decode_responses=True)

    async def up() -> bool:
        with contextlib.suppress(RedisError, OSError):
            return bool(await redis.ping())
        return False

    await wait_until(up, "the test's own Redis", within=10)
    relay = Relay(redis, full)
    task = asyncio.create_task(relay.run(exchange))
    try:

        async def beating() -> bool:
            return len(await heartbeats(redis, keys)) == 1

        await wait_until(beating, "the relay's heartbeat", within=10)
        await fill(redis)
        # Three TTLs: a heartbeat refused once would be gone after the first.
        deadline = time.monotonic() + 3 * HEARTBEAT
        while time.monotonic() < deadline:
            assert len(await heartbeats(redis, keys)) == 1, "the heartbeat expired"
            await asyncio.sleep(0.05)  # a poll interval over a fixed span
    finally:
        await relay.stop(task)
        await redis.aclose()
