"""What the relay delivered: every message of a worker queue, taken off it with a
consumer (thousands of messages, where a basic.get each would take long), and outbox
entries written straight into the stream the way the scripts write them."""

from __future__ import annotations

import asyncio
import uuid
from typing import cast

import aio_pika
import orjson
from aio_pika.abc import AbstractIncomingMessage
from redis.asyncio import Redis

from session_close.keys import Keys


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


async def write_entries(redis: Redis, keys: Keys, entries: list[dict[str, str | bytes]]) -> None:
    """XADD each entry to the outbox, in pipelines of a thousand."""
    for start in range(0, len(entries), 1000):
        pipe = redis.pipeline(transaction=False)
        for entry in entries[start : start + 1000]:
            pipe.xadd(keys.outbox, entry)  # type: ignore[arg-type]
        await pipe.execute()


async def stream_entries(redis: Redis, key: str) -> list[tuple[str, dict[str, str]]]:
    """Every entry of a stream (the outbox, the dead letters): id and fields, oldest first."""
    return cast(list[tuple[str, dict[str, str]]], await redis.xrange(key))
