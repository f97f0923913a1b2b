"""What the relay delivered: every message of a worker queue, taken off it with a
consumer (thousands of messages, where a basic.get each would take long); outbox entries
written straight into the outbox of their user's bucket the way the scripts write them;
and what the outboxes hold, summed over every bucket."""

from __future__ import annotations

import asyncio
import uuid
import zlib
from typing import cast

import aio_pika
import orjson
from aio_pika.abc import AbstractIncomingMessage
from redis.asyncio import Redis

from session_close.keys import BUCKETS, OUTBOX_GROUP, Keys, bucket_of


async def take_messages(
    amqp_url: str, queue: str, *, within: float = 60
) -> list[dict[str, object]]:
    """Every message now on `queue`, taken off it: their JSON bodies with the message id
    under "messageId", in order."""
    taken: list[dict[str, object]] = []
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        total = declared.declaration_result.message_count or 0
        if total == 0:
            return taken
        all_taken = asyncio.Event()

        async def on_message(message: AbstractIncomingMessage) -> None:
            taken.append({**orjson.loads(message.body), "messageId": message.message_id})
            if len(taken) >= total:
                all_taken.set()

        tag = await declared.consume(on_message, no_ack=True)
        await asyncio.wait_for(all_taken.wait(), within)
        await declared.cancel(tag)
    return taken


def closed_entry(n: int, **fields: str | bytes) -> dict[str, str | bytes]:
    """The fields close_sessions.lua writes for a close, with `fields` on top."""
    entry: dict[str, str | bytes] = {
        "type": "session.closed",
        "reason": "user_logout",
        "event_id": str(uuid.uuid4()),
        "session_id": f"direct-{n:05d}",
        "user_id": "user-1",
        "closed_at": "2026-01-01T00:00:00.000Z",
        "os": "Android",
        "app_version": "1.0.10",
        "request_id": f"request-{n}",
        "traceparent": "",
    }
    entry.update(fields)
    return entry


def user_in_bucket(bucket: int, stem: str = "user") -> str:
    """A user id (`<stem>-<n>`, the first such n) whose bucket is `bucket`."""
    n = 0
    while bucket_of(f"{stem}-{n}") != bucket:
        n += 1
    return f"{stem}-{n}"


def entry_bucket(entry: dict[str, str | bytes]) -> int:
    """The bucket whose outbox an entry goes to: its user_id's (an entry without one goes
    where `sessionctl outbox replay` puts it, the bucket of the empty id)."""
    user_id = entry.get("user_id", "")
    if isinstance(user_id, bytes):
        return zlib.crc32(user_id) % BUCKETS
    return bucket_of(user_id)


async def write_entries(redis: Redis, keys: Keys, entries: list[dict[str, str | bytes]]) -> None:
    """XADD each entry to the outbox of its user's bucket, in pipelines of a thousand."""
    for start in range(0, len(entries), 1000):
        pipe = redis.pipeline(transaction=False)
        for entry in entries[start : start + 1000]:
            pipe.xadd(keys.outbox(entry_bucket(entry)), entry)  # type: ignore[arg-type]
        await pipe.execute()


async def outbox_length(redis: Redis, keys: Keys) -> int:
    """Entries in every bucket's outbox together (XLEN of each, one pipeline)."""
    pipe = redis.pipeline(transaction=False)
    for outbox in keys.outboxes:
        pipe.xlen(outbox)
    return sum(int(length) for length in await pipe.execute())


async def pending_by_consumer(redis: Redis, keys: Keys) -> dict[str, int]:
    """The relays' pending entries in every bucket's outbox, summed per consumer name (a
    bucket whose stream or group does not exist yet holds none)."""
    pipe = redis.pipeline(transaction=False)
    for outbox in keys.outboxes:
        pipe.xpending(outbox, OUTBOX_GROUP)
    held: dict[str, int] = {}
    for summary in await pipe.execute(raise_on_error=False):
        if isinstance(summary, Exception):
            assert "NOGROUP" in str(summary), summary
            continue
        for consumer in summary["consumers"]:
            held[consumer["name"]] = held.get(consumer["name"], 0) + int(consumer["pending"])
    return held


async def stream_entries(redis: Redis, key: str) -> list[tuple[str, dict[str, str]]]:
    """Every entry of a stream (the outbox, the dead letters): id and fields, oldest first."""
    return cast(list[tuple[str, dict[str, str]]], await redis.xrange(key))
