"""Reading what reached RabbitMQ, for tests that count events."""

from __future__ import annotations

import asyncio
from collections import Counter

import aio_pika

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
