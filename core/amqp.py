"""The RabbitMQ connection shared by the API's relay and the workers.

connect() waits for the broker with capped backoff instead of failing the process, so
the API serves closes (and queues their events in the outbox) while RabbitMQ is down.
Once connected, aio-pika's robust connection restores channels and consumers itself.
"""

from __future__ import annotations

import asyncio
import logging

import aio_pika
from aio_pika.abc import AbstractRobustConnection

from core.settings import Settings

log = logging.getLogger(__name__)


async def connect(settings: Settings, *, max_backoff: float = 5.0) -> AbstractRobustConnection:
    backoff = 0.2
    while True:
        try:
            return await aio_pika.connect_robust(
                settings.amqp_url,
                timeout=max(settings.publish_timeout_seconds, 1.0),
                client_properties={"connection_name": "eliab-session-close"},
            )
        except (TimeoutError, OSError, aio_pika.exceptions.AMQPError) as exc:
            log.warning("RabbitMQ unreachable (%s); retrying in %.1fs", exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, max_backoff)


def is_open(connection: AbstractRobustConnection | None) -> bool:
    return connection is not None and not connection.is_closed and connection.connected.is_set()


async def connect_and_declare(settings: Settings) -> AbstractRobustConnection:
    """Connect (waiting for the broker) and declare the whole topology once."""
    from core.topology import Topology

    connection = await connect(settings)
    async with connection.channel() as channel:
        await Topology.from_settings(settings).declare(channel)
    return connection
