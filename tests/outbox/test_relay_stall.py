"""A relay never strands what it read (docs/events.md, issue 19): a read whose reply is
lost in a Redis stall, or that the relay never saw as failed, leaves entries in its own
pending list, and it publishes them within 10 s, the bound of a takeover."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable

import aio_pika
import pytest
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
from tests.support.closing import BODY, CLOSE_PATH, Client, app_headers, open_session
from tests.support.delivered import (
    closed_entry,
    outbox_length,
    pending_by_consumer,
    take_messages,
)
from tests.support.proxy import TcpProxy
from tests.support.waiting import wait_until

pytestmark = pytest.mark.fault

USER, TOKEN = "user-1", "token-of-user-1"
CLOSES = 500
THROUGH_API = 400  # the rest are written while Redis stalls, straight into Redis
RATE = 300  # closes per second
STALL = 1.5


async def close_until_done(client: Client, sid: str) -> None:
    """Close as a mobile app does: a 503 (Redis did not answer) is retried."""
    for _ in range(50):
        resp = await client.post(CLOSE_PATH, headers=app_headers(TOKEN, sid), data=BODY)
        if resp.status == 200:
            return
        assert resp.status == 503, await resp.text()
        await asyncio.sleep(0.1)  # the app's pause before its retry
    raise AssertionError(f"{sid} never closed")


async def close_at_rate(client: Client, sids: list[str]) -> None:
    closes = []
    for sid in sids:
        closes.append(asyncio.create_task(close_until_done(client, sid)))
        await asyncio.sleep(1 / RATE)  # the pace of arrivals, not a wait for a state
    await asyncio.gather(*closes)


async def pending(redis: Redis, keys: Keys) -> int:
    """The relays' pending entries, in every bucket's outbox."""
    return sum((await pending_by_consumer(redis, keys)).values())


async def test_entries_whose_read_reply_a_redis_stall_lost_are_published_within_10_s(
    settings: Settings,
    redis: Redis,
    keys: Keys,
    amqp_cleanup: None,
    redis_proxy: TcpProxy,
    aiohttp_client: AiohttpClient,
    report_counts: Callable[..., None],
) -> None:
    # A client timeout longer than the stall: the stalled read fails when the stall ends
    # (its connection dropped), which a client-level retry would hide by reading again.
    proxied = dataclasses.replace(
        settings, redis_url=through(settings.redis_url, redis_proxy), redis_timeout_seconds=3.0
    )
    sids = [f"session-{n:04d}" for n in range(CLOSES)]
    for sid in sids:
        await open_session(redis, keys, USER, sid, TOKEN)
    client: Client = await aiohttp_client(create_app(proxied))
    await asyncio.wait_for(asyncio.shield(client.app[AMQP]), 10)
    await close_at_rate(client, sids[: THROUGH_API // 2])

    async def idle() -> bool:
        return await outbox_length(redis, keys) == 0 and await pending(redis, keys) == 0

    await wait_until(idle, "the relay to publish the first closes", within=15)

    # The idle relay waits in a blocking XREADGROUP >. Redis stalls (its replies stop
    # arriving); closes that reach Redis meanwhile are handed to that read, whose reply
    # is lost.
    redis_proxy.cut("silent")
    stalled = time.monotonic()
    stranded = sids[THROUGH_API:]
    bucket = bucket_of(USER)
    script_keys: list[str] = []
    args: list[object] = [600, "2026-01-01T00:00:00.000Z"]
    for sid in stranded:
        script_keys += [
            keys.outbox(bucket),
            keys.expiry(bucket),
            keys.session(USER, sid),
            keys.tombstone(USER, sid),
            keys.user_sessions(USER),
        ]
        args += [
            USER,
            sid,
            f"00000000-0000-4000-8000-{sid[-4:]:0>12}",
            "",
            "",
            "",
            "",
        ]
    assert await CLOSE_SESSIONS(redis, script_keys, args) == ["closed"] * len(stranded)

    async def read_and_lost() -> bool:
        return await pending(redis, keys) == len(stranded)

    await wait_until(read_and_lost, "the stalled read to take the entries", within=1.0)
    more = asyncio.create_task(close_at_rate(client, sids[THROUGH_API // 2 : THROUGH_API]))
    await asyncio.sleep(max(0.0, STALL - (time.monotonic() - stalled)))  # the stall's length
    redis_proxy.restore()
    restored = time.monotonic()
    await more

    async def all_published() -> bool:
        return await outbox_length(redis, keys) == 0 and await pending(redis, keys) == 0

    await wait_until(all_published, "every event published, none pending", within=10)
    published_after = time.monotonic() - restored
    queue = Topology.from_settings(settings).queue("audit")
    subjects = [str(m["subject"]) for m in await take_messages(settings.amqp_url, queue)]
    report_counts(
        closes=CLOSES,
        stranded=len(stranded),
        delivered=len(subjects),
        distinct=len(set(subjects)),
        pending=await pending(redis, keys),
        published_after_stall_s=round(published_after, 2),
    )
    assert sorted(set(subjects)) == sids
    assert published_after <= 10


async def test_an_entry_left_in_a_live_relays_own_pending_list_is_published_at_its_next_beat(
    redis: Redis, keys: Keys, settings: Settings, amqp_cleanup: None
) -> None:
    """A read whose reply never came back and that the relay never saw fail (what a
    client-level retry did): the entry is the relay's, and only it can publish it."""
    await ensure_group(redis, keys)
    entry = closed_entry(1)
    outbox = keys.outbox(bucket_of(str(entry["user_id"])))
    connection = await aio_pika.connect_robust(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await Topology.from_settings(settings).declare(channel)
        relay = Relay(redis, settings)
        task = asyncio.create_task(relay.run(exchange))
        try:

            async def reading() -> bool:
                return len(await redis.xinfo_consumers(outbox, OUTBOX_GROUP)) == 1

            await wait_until(reading, "the relay to read", within=10)
            (consumer,) = await redis.xinfo_consumers(outbox, OUTBOX_GROUP)
            # Appended and read under the relay's name in one step: its own blocking
            # read never gets the entry, which sits in its pending list.
            pipe = redis.pipeline(transaction=True)
            pipe.xadd(outbox, entry)  # type: ignore[arg-type]
            pipe.xreadgroup(OUTBOX_GROUP, consumer["name"], {outbox: ">"}, count=1)
            await pipe.execute()
            assert await pending(redis, keys) == 1
            left = time.monotonic()

            async def published() -> bool:
                return await outbox_length(redis, keys) == 0

            await wait_until(published, "the relay to publish its own pending entry", within=10)
            waited = time.monotonic() - left
        finally:
            await relay.stop(task)
    queue = Topology.from_settings(settings).queue("audit")
    delivered = await take_messages(settings.amqp_url, queue)
    assert [m["messageId"] for m in delivered] == [entry["event_id"]]
    # A heartbeat tick is a third of the heartbeat's TTL.
    assert waited <= settings.relay_heartbeat_seconds / 3 + 2
