"""The RabbitMQ connection shared by the API's relay and the workers.

connect() waits for the broker with capped backoff instead of failing the process, so
the API serves closes (and queues their events in the outbox) while RabbitMQ is down.
Once connected, aio-pika's robust connection restores channels and consumers itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aio_pika
from aio_pika.abc import AbstractRobustConnection

from session_close.retry import Policy, retry
from session_close.settings import Settings

log = logging.getLogger(__name__)

# Closing a connection to a broker that went silent must not hold anything up.
CLOSE_TIMEOUT_SECONDS = 2.0
BROKER = Policy(first=0.2, cap=5.0)


async def connect(settings: Settings, *, policy: Policy = BROKER) -> AbstractRobustConnection:
    async def attempt() -> AbstractRobustConnection:
        connection = aio_pika.RobustConnection(
            aio_pika.connection.make_url(settings.amqp_url),
            client_properties={"connection_name": "eliab-session-close"},
        )
        try:
            await connection.connect(timeout=max(settings.publish_timeout_seconds, 1.0))
        except BaseException:
            # Unlike aio_pika.connect_robust, close what a failed or cancelled attempt
            # started: its reconnect task ignores cancellation until close() is called,
            # and would otherwise keep the event loop from ever shutting down.
            await close_quietly(connection)
            raise
        return connection

    return await retry(
        "connecting to RabbitMQ",
        attempt,
        policy=policy,
        transient=(TimeoutError, OSError, aio_pika.exceptions.AMQPError),
    )


async def close_quietly(connection: AbstractRobustConnection) -> None:
    """Close within CLOSE_TIMEOUT_SECONDS, whatever state the link is in."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
            await connection.close()


def is_open(connection: AbstractRobustConnection | None) -> bool:
    return connection is not None and not connection.is_closed and connection.connected.is_set()


async def connect_and_declare(
    settings: Settings, *, policy: Policy = BROKER
) -> AbstractRobustConnection:
    """Connect (waiting for the broker) and declare the whole topology once.

    A declaration that fails (the broker lost halfway through, or an exchange or queue
    declared elsewhere with other arguments) is retried on a new connection: giving up
    would leave the relay, which waits for this, dead until the process restarts.
    """
    from session_close.topology import Topology

    topology = Topology.from_settings(settings)

    async def attempt() -> AbstractRobustConnection:
        connection = await connect(settings, policy=policy)
        try:
            # A robust channel waits forever for a broker that went silent.
            async with asyncio.timeout(max(settings.publish_timeout_seconds, 1.0) * 2):
                async with connection.channel() as channel:
                    await topology.declare(channel)
        except BaseException:
            await close_quietly(connection)
            raise
        return connection

    return await retry("declaring the AMQP topology", attempt, policy=policy)
