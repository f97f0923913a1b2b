"""The outbox and the expiry index are sharded over the 256 buckets of the key layout
(docs/redis.md): one relay publishes the entries of every bucket's outbox, once each; a
dead relay's entries are taken over bucket by bucket, within the bound of a takeover;
and one sweep reaches the expiry index of every bucket."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator

import aio_pika
import pytest
from aio_pika.abc import AbstractExchange
from redis.asyncio import Redis

from outbox.relay import Relay
from outbox.stream import ensure_group
from outbox.sweeper import Sweeper, SweepResult
from session_close.cli import create_session
from session_close.keys import OUTBOX_GROUP, Keys
from session_close.settings import Settings
from session_close.topology import Topology
from tests.support.delivered import (
    closed_entry,
    outbox_length,
    pending_by_consumer,
    stream_entries,
    take_messages,
    user_in_bucket,
    write_entries,
)
from tests.support.waiting import wait_until

# The first and the last bucket, and a few between.
SOME_BUCKETS = (0, 1, 37, 128, 200, 254, 255)
# The bound of a takeover, from the dead relay's last heartbeat (test_relay.py's).
TAKEOVER_SECONDS = 10


@pytest.fixture
async def exchange(settings: Settings, amqp_cleanup: None) -> AsyncIterator[AbstractExchange]:
    connection = await aio_pika.connect_robust(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        yield await Topology.from_settings(settings).declare(channel)


async def lengths(redis: Redis, keys: Keys, buckets: tuple[int, ...]) -> dict[int, int]:
    return {b: int(await redis.xlen(keys.outbox(b))) for b in buckets}


async def test_one_relay_publishes_the_entries_of_every_bucket_once_and_removes_them(
    redis: Redis, keys: Keys, settings: Settings, exchange: AbstractExchange
) -> None:
    await ensure_group(redis, keys)
    users = {b: user_in_bucket(b) for b in SOME_BUCKETS}
    before = [
        closed_entry(n, user_id=users[b], session_id=f"before-{b:03d}")
        for n, b in enumerate(SOME_BUCKETS)
    ]
    # Written before the relay starts: its first reads find them in every bucket.
    await write_entries(redis, keys, before)
    assert await lengths(redis, keys, SOME_BUCKETS) == dict.fromkeys(SOME_BUCKETS, 1)
    relay = Relay(redis, settings)
    task = asyncio.create_task(relay.run(exchange))
    try:

        async def drained() -> bool:
            return await outbox_length(redis, keys) == 0

        await wait_until(drained, "the entries written before the relay started", within=15)
        # Written while it waits for new entries: its read wakes for any bucket.
        after = [
            closed_entry(100 + n, user_id=users[b], session_id=f"after-{b:03d}")
            for n, b in enumerate(reversed(SOME_BUCKETS))
        ]
        for entry in after:
            await write_entries(redis, keys, [entry])
        await wait_until(drained, "the entries written while the relay waited", within=15)
    finally:
        await relay.stop(task)
    queue = Topology.from_settings(settings).queue("audit")
    delivered = await take_messages(settings.amqp_url, queue)
    assert sorted(str(m["messageId"]) for m in delivered) == sorted(
        str(e["event_id"]) for e in [*before, *after]
    )
    assert await lengths(redis, keys, SOME_BUCKETS) == dict.fromkeys(SOME_BUCKETS, 0)
    # Removed, not merely left acknowledged: nothing pending either.
    assert sum((await pending_by_consumer(redis, keys)).values()) == 0


async def test_a_dead_relays_entries_in_two_buckets_are_both_taken_over_within_10_s(
    redis: Redis, keys: Keys, settings: Settings, exchange: AbstractExchange
) -> None:
    """With the default heartbeat, as test_relay.py's takeover of a killed relay: the
    dead relay beat a last time as it died, so its heartbeat outlives it by the TTL."""
    await ensure_group(redis, keys)
    low, high = 3, 250
    users = {low: user_in_bucket(low), high: user_in_bucket(high)}
    entries = [closed_entry(n, user_id=users[low if n % 2 else high]) for n in range(10)]
    await write_entries(redis, keys, entries)
    # A relay that read every entry of both buckets, then died holding them.
    await redis.xreadgroup(
        OUTBOX_GROUP, "dead-relay", {keys.outbox(low): ">", keys.outbox(high): ">"}, count=10
    )
    await redis.set(
        keys.relay_heartbeat("dead-relay"), "1", px=int(settings.relay_heartbeat_seconds * 1000)
    )
    died = time.monotonic()
    for b in (low, high):
        summary = await redis.xpending(keys.outbox(b), OUTBOX_GROUP)
        assert [(c["name"], int(c["pending"])) for c in summary["consumers"]] == [("dead-relay", 5)]
    relay = Relay(redis, settings)
    task = asyncio.create_task(relay.run(exchange))
    try:

        async def drained() -> bool:
            return await outbox_length(redis, keys) == 0

        await wait_until(
            drained, "the dead relay's entries in both buckets", within=TAKEOVER_SECONDS + 5
        )
        took = time.monotonic() - died
    finally:
        await relay.stop(task)
    for b in (low, high):
        names = [c["name"] for c in await redis.xinfo_consumers(keys.outbox(b), OUTBOX_GROUP)]
        assert "dead-relay" not in names, f"bucket {b}"
    queue = Topology.from_settings(settings).queue("audit")
    delivered = await take_messages(settings.amqp_url, queue)
    assert sorted(str(m["messageId"]) for m in delivered) == sorted(
        str(e["event_id"]) for e in entries
    )
    assert took <= TAKEOVER_SECONDS


async def test_one_sweep_interval_sweeps_the_sessions_of_users_in_every_bucket(
    redis: Redis, keys: Keys, settings: Settings
) -> None:
    users = {b: user_in_bucket(b) for b in SOME_BUCKETS}
    expired_at = time.time() - 5
    sids: dict[int, list[str]] = {}
    for b, user in users.items():
        sids[b] = [f"sid-{b:03d}-{k}" for k in range(2)]
        for sid in sids[b]:
            await create_session(redis, keys, user, sid, ttl=600, expiry_grace=3600)
            # Its logical end already past, in the session and in its bucket's index.
            await redis.hset(keys.session(user, sid), "expires_at", expired_at)
            await redis.zadd(keys.expiry(b), {sid: expired_at})
    total = 2 * len(SOME_BUCKETS)
    seen: list[SweepResult] = []
    # An interval far longer than the test: everything is swept by the loop's first sweep.
    sweeper = Sweeper(
        redis, dataclasses.replace(settings, sweep_interval_seconds=600), on_sweep=seen.append
    )
    task = asyncio.create_task(sweeper.run())
    try:
        # Both: the test may read the entries before the sweeper has handled its reply.
        async def swept() -> bool:
            return await outbox_length(redis, keys) == total and bool(seen)

        await wait_until(swept, "a session.expired entry for each session, reported", within=10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert [r.expired for r in seen] == [total]
    for b, user in users.items():
        entries = [fields for _, fields in await stream_entries(redis, keys.outbox(b))]
        assert sorted((e["type"], e["user_id"], e["session_id"]) for e in entries) == [
            ("session.expired", user, sid) for sid in sids[b]
        ]
        assert await redis.zcard(keys.expiry(b)) == 0
        assert await redis.smembers(keys.user_sessions(user)) == set()
