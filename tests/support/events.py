"""Reading what reached RabbitMQ, for tests that count events."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from session_close.settings import Settings
from session_close.topology import Topology


async def collect_event_ids(
    settings: Settings, worker: str, expected: int, deadline: float = 30.0
) -> Counter[str]:
    """Consume (and ack) the worker queue until `expected` distinct event ids arrived or
    the deadline passed; return how often each id was seen (a count > 1 is a duplicate)."""
    seen: Counter[str] = Counter()
    queue_name = Topology.from_settings(settings).queue(worker)
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(queue_name, ensure=True)
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        while len(seen) < expected and loop.time() < end:
            message = await queue.get(fail=False, no_ack=True)
            if message is None:
                await asyncio.sleep(0.05)  # polling an empty queue, not waiting for a result
                continue
            seen[message.message_id or ""] += 1
        # whatever else is already there counts too (late duplicates)
        while (message := await queue.get(fail=False, no_ack=True)) is not None:
            seen[message.message_id or ""] += 1
    return seen


@asynccontextmanager
async def collecting(
    settings: Settings, worker: str
) -> AsyncIterator[list[AbstractIncomingMessage]]:
    """The messages arriving on a worker's queue (its topology declared first), acked and
    collected as they come, while the block runs."""
    received: list[AbstractIncomingMessage] = []
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        topology = Topology.from_settings(settings)
        await topology.declare(channel)
        queue = await channel.get_queue(topology.queue(worker))

        async def on_message(message: AbstractIncomingMessage) -> None:
            received.append(message)
            await message.ack()

        await queue.consume(on_message)
        yield received
