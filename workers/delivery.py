"""Where the workers reach under aio-pika: deliveries taken from aiormq directly.

aio-pika hands each delivery to a consumer as an IncomingMessage, built (every property
parsed into attributes) in a task of its own, which itself runs the callback in a second
task. The runner needs the body, the delivery tag and the channel to settle on, so it
consumes through the robust channel's aiormq channel and settles with aiormq's
basic.ack/reject/nack. The robust channel still reconnects, re-declares and restores the
QoS; it does not know this consumer, so `Consumer` registers it again on every reopen.
Everything aiormq-specific of the workers is in this module.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

import aiormq
from aio_pika.abc import AbstractRobustChannel
from aiormq.abc import DeliveredMessage

log = logging.getLogger(__name__)

__all__ = ["Consumer", "DeliveredMessage", "ack", "channel_closed", "message_id", "nack", "reject"]

OnMessage = Callable[[DeliveredMessage], Coroutine[Any, Any, None]]


class Consumer:
    """A consumer of one queue on a robust channel, re-registered after each reconnect."""

    def __init__(self, channel: AbstractRobustChannel, queue: str, on_message: OnMessage) -> None:
        self._channel = channel
        self._queue = queue
        self._on_message = on_message
        self._tag: str | None = None
        self._underlay: aiormq.abc.AbstractChannel | None = None

    async def start(self) -> None:
        await self._consume()
        self._channel.reopen_callbacks.add(self._resume)

    async def cancel(self) -> None:
        """Stop deliveries: the broker sends nothing more, the messages in hand stay ours."""
        self._channel.reopen_callbacks.discard(self._resume)
        if self._underlay is not None and self._tag is not None:
            await self._underlay.basic_cancel(self._tag)

    async def _consume(self) -> None:
        self._underlay = await self._channel.get_underlay_channel()
        ok = await self._underlay.basic_consume(self._queue, self._on_message, no_ack=False)
        self._tag = ok.consumer_tag

    async def _resume(self, channel: AbstractRobustChannel | None, /) -> None:
        # After the robust channel re-opened (QoS and queue already restored).
        await self._consume()
        log.info("consuming again after a reconnect", extra={"queue": self._queue})


def message_id(message: DeliveredMessage) -> str | None:
    return message.header.properties.message_id


def channel_closed(message: DeliveredMessage) -> bool:
    return message.channel.is_closed


async def ack(message: DeliveredMessage, *, multiple: bool) -> None:
    """Ack this message, and with multiple every unacked one before it on its channel."""
    assert message.delivery_tag is not None
    await message.channel.basic_ack(message.delivery_tag, multiple=multiple)


async def reject(message: DeliveredMessage) -> None:
    """Reject without requeue: the queue's dead-letter exchange takes it."""
    assert message.delivery_tag is not None
    await message.channel.basic_reject(message.delivery_tag, requeue=False)


async def nack(message: DeliveredMessage) -> None:
    """Hand it back to the queue."""
    assert message.delivery_tag is not None
    await message.channel.basic_nack(message.delivery_tag, requeue=True)
