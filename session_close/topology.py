"""The AMQP topology, declared identically by the API and by every worker.

Exchange `<AMQP_EXCHANGE>` (topic) routes `session.closed` and `session.expired` to one
quorum queue per worker; a message a worker rejects goes through `<AMQP_EXCHANGE>.dlx`
to that worker's `<queue>.dlq`. Declaring is idempotent as long as the arguments never
differ, which is why this is the only place that names them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange
from pamqp.common import FieldTable

from session_close.events import EVENT_TYPES
from session_close.settings import Settings

# Each event type is its own routing key; every worker's queue takes them all.
ROUTING_KEYS = EVENT_TYPES
WORKERS = ("audit", "push-cleanup")
# The transmitter's queue (signals/), declared by the transmitter alone.
TRANSMITTER = "signals"


@dataclass(frozen=True, slots=True)
class Topology:
    exchange: str
    queue_prefix: str

    @classmethod
    def from_settings(cls, settings: Settings) -> Topology:
        return cls(exchange=settings.amqp_exchange, queue_prefix=settings.amqp_queue_prefix)

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.exchange}.dlx"

    def queue(self, worker: str) -> str:
        return f"{self.queue_prefix}{worker}"

    def dead_letter_queue(self, worker: str) -> str:
        return f"{self.queue(worker)}.dlq"

    def queue_arguments(self, worker: str) -> FieldTable:
        return {
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": self.dead_letter_exchange,
            "x-dead-letter-routing-key": self.queue(worker),
        }

    async def declare(
        self, channel: AbstractChannel, workers: Sequence[str] = WORKERS
    ) -> AbstractExchange:
        """Declare the exchange, and each worker's queue and its dead-letter queue."""
        exchange = await channel.declare_exchange(
            self.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        dlx = await channel.declare_exchange(
            self.dead_letter_exchange, aio_pika.ExchangeType.DIRECT, durable=True
        )
        for worker in workers:
            queue = await channel.declare_queue(
                self.queue(worker), durable=True, arguments=self.queue_arguments(worker)
            )
            for routing_key in ROUTING_KEYS:
                await queue.bind(exchange, routing_key)
            dlq = await channel.declare_queue(
                self.dead_letter_queue(worker),
                durable=True,
                arguments={"x-queue-type": "quorum"},
            )
            await dlq.bind(dlx, self.queue(worker))
        return exchange
