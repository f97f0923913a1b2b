"""`python -m workers replay-dlq audit|push-cleanup [--limit N]`: move dead-lettered
messages back to the worker's queue.

Each message is republished, body and properties unchanged, straight to the work queue
(the default exchange, so the other worker does not get a second copy), with publisher
confirms, and only then acked off the dead-letter queue: a crash in between leaves a
copy in both, which the idempotent workers absorb, never a lost message. At most the
number of messages present at start is moved, so a message that is dead-lettered again
while the replay runs is not replayed in a loop.
"""

from __future__ import annotations

import asyncio
import logging

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from session_close.amqp import connect
from session_close.settings import Settings
from session_close.topology import Topology

log = logging.getLogger(__name__)

GET_TIMEOUT_SECONDS = 5.0
# A command run by hand: give up on a broker that is down rather than wait forever.
CONNECT_TIMEOUT_SECONDS = 30.0


def copy_of(message: AbstractIncomingMessage) -> aio_pika.Message:
    return aio_pika.Message(
        message.body,
        headers=message.headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=message.delivery_mode,
        priority=message.priority,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        message_id=message.message_id,
        timestamp=message.timestamp,
        type=message.type,
        user_id=message.user_id,
        app_id=message.app_id,
    )


async def replay_dead_letters(settings: Settings, worker: str, limit: int | None = None) -> int:
    """Returns how many messages were moved."""
    topology = Topology.from_settings(settings)
    connection = await asyncio.wait_for(connect(settings), CONNECT_TIMEOUT_SECONDS)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await topology.declare(channel)
        dlq = await channel.declare_queue(topology.dead_letter_queue(worker), passive=True)
        present = dlq.declaration_result.message_count or 0
        todo = present if limit is None else min(present, limit)
        target = topology.queue(worker)
        moved = 0
        while moved < todo:
            message = await dlq.get(no_ack=False, fail=False, timeout=GET_TIMEOUT_SECONDS)
            if message is None:
                break
            try:
                await channel.default_exchange.publish(
                    copy_of(message), routing_key=target, mandatory=True
                )
            except BaseException:
                await message.nack(requeue=True)
                raise
            await message.ack()
            moved += 1
        log.info(
            "dead-lettered messages replayed",
            extra={"moved": moved, "present": present, "queue": target},
        )
        return moved
