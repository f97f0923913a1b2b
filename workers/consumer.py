"""The runner every worker shares: consume the worker's quorum queue, apply the effect,
ack after it.

- Prefetch (channel QoS) bounds what the broker hands over; a semaphore bounds how many
  messages are worked on at once.
- A malformed message is rejected without requeue: the queue's dead-letter exchange
  moves it to `<queue>.dlq` at once, and a log line says why.
- Any other failure (PostgreSQL or Redis unreachable) is retried with capped exponential
  backoff while the message is held; a good message is never dead-lettered.
- SIGTERM, the way arq stops: cancel the consumer so nothing new arrives, let the
  messages in hand finish within SHUTDOWN_TIMEOUT_SECONDS (those waiting or retrying go
  back to the queue at once), return the rest, close the connections, exit 0.

Delivery is at least once, so every effect must be idempotent: a message whose ack was
lost with the connection comes back and must change nothing the second time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from typing import Protocol

import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection
from aio_pika.exceptions import ChannelInvalidStateError

from session_close.amqp import connect
from session_close.events import MalformedEvent, SessionClosed
from session_close.retry import Backoff, Policy
from session_close.runtime import tune_gc
from session_close.settings import Settings
from session_close.topology import Topology
from workers.metrics import WorkerMetrics

log = logging.getLogger(__name__)


RETRY = Policy(first=0.1, cap=5.0)
# Bounds on broker round trips during shutdown, so a dead broker cannot hold it up.
BROKER_CALL_TIMEOUT_SECONDS = 2.0


class Effect(Protocol):
    """What a worker does with one event. It must be idempotent; it raises MalformedEvent
    for an event it can never store, anything else for a failure worth retrying."""

    transient: tuple[type[BaseException], ...]  # expected failures, logged without traceback

    async def apply(self, event: SessionClosed) -> None: ...


EffectFactory = Callable[[Settings], AbstractAsyncContextManager[Effect]]


class Worker:
    def __init__(
        self,
        settings: Settings,
        name: str,
        open_effect: EffectFactory,
        *,
        metrics: WorkerMetrics | None = None,
        retry_policy: Policy = RETRY,
    ) -> None:
        self.name = name
        self.metrics = metrics or WorkerMetrics(name)
        self._settings = settings
        self._open_effect = open_effect
        self._retry_policy = retry_policy
        self._topology = Topology.from_settings(settings)
        self._slots = asyncio.Semaphore(settings.worker_concurrency)
        self._stopping = asyncio.Event()
        self._in_hand: set[asyncio.Task[object]] = set()
        self._effect: Effect | None = None
        self._main: asyncio.Task[object] | None = None
        self.consuming = asyncio.Event()

    def stop(self) -> None:
        """Begin a graceful stop (signal handlers call this)."""
        if self._stopping.is_set():
            return
        log.info("worker %s stopping", self.name)
        self._stopping.set()
        if not self.consuming.is_set() and self._main is not None:
            # Still waiting for a backend at start: nothing in hand, just give up.
            self._main.cancel()

    async def run(self) -> None:
        """Consume until stop(); returns once everything in hand is settled and closed."""
        self._main = asyncio.current_task()
        try:
            async with AsyncExitStack() as stack:
                self._effect = await stack.enter_async_context(self._open_effect(self._settings))
                connection = await connect(self._settings)
                stack.push_async_callback(self._close_connection, connection)
                queue = await self._declare(connection)
                tag = await queue.consume(self._on_message)
                self.consuming.set()
                log.info(
                    "worker %s consuming %s (prefetch %d, concurrency %d)",
                    self.name,
                    queue.name,
                    self._settings.worker_prefetch,
                    self._settings.worker_concurrency,
                )
                await self._stopping.wait()
                await self._shutdown(queue, tag)
        except asyncio.CancelledError:
            if not self._stopping.is_set() or self.consuming.is_set():
                raise
            log.info("worker %s stopped before it started consuming", self.name)
        log.info("worker %s stopped", self.name)

    async def _declare(self, connection: AbstractRobustConnection) -> AbstractQueue:
        # A robust channel re-declares all of this, QoS included, after a reconnect, and
        # re-registers the consumer on the queue object returned here.
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=self._settings.worker_prefetch)
        await self._topology.declare(channel)
        return await channel.declare_queue(
            self._topology.queue(self.name),
            durable=True,
            arguments=self._topology.queue_arguments(self.name),
        )

    async def _shutdown(self, queue: AbstractQueue, tag: str) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(BROKER_CALL_TIMEOUT_SECONDS):
                await queue.cancel(tag)
        if self._in_hand:
            log.info("worker %s finishing %d messages in hand", self.name, len(self._in_hand))
            _, late = await asyncio.wait(
                self._in_hand, timeout=self._settings.shutdown_timeout_seconds
            )
            for task in late:
                task.cancel()  # _on_message returns its message to the queue
            if late:
                log.warning("worker %s returning %d unfinished messages", self.name, len(late))
                await asyncio.wait(late, timeout=BROKER_CALL_TIMEOUT_SECONDS * 2)

    @staticmethod
    async def _close_connection(connection: AbstractRobustConnection) -> None:
        # Unacked messages go back to the queue when the connection closes, whatever
        # happened to our explicit nacks.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(BROKER_CALL_TIMEOUT_SECONDS):
                await connection.close()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._in_hand.add(task)
        started = asyncio.get_running_loop().time()
        try:
            outcome = await self._process(message)
        except asyncio.CancelledError:
            await self._settle(message, requeue=True)
            self.metrics.settled("requeued", asyncio.get_running_loop().time() - started)
            raise
        finally:
            self._in_hand.discard(task)
        self.metrics.settled(outcome, asyncio.get_running_loop().time() - started)

    async def _process(self, message: AbstractIncomingMessage) -> str:
        if self._stopping.is_set():
            return await self._settle(message, requeue=True)
        try:
            event = SessionClosed.decode(message.body)
        except MalformedEvent as exc:
            return await self._dead_letter(message, str(exc))
        with structlog.contextvars.bound_contextvars(
            request_id=event.request_id, event_id=event.event_id
        ):
            async with self._slots:
                if self._stopping.is_set():
                    return await self._settle(message, requeue=True)
                return await self._apply(message, event)

    async def _apply(self, message: AbstractIncomingMessage, event: SessionClosed) -> str:
        assert self._effect is not None
        backoff = Backoff(self._retry_policy)
        retried = False
        while True:
            try:
                await self._effect.apply(event)
            except MalformedEvent as exc:
                return await self._dead_letter(message, str(exc))
            except Exception as exc:
                retried = True
                self.metrics.retried()
                delay = backoff.next_delay()
                log.warning(
                    "worker could not apply event; retrying",
                    exc_info=not isinstance(exc, self._effect.transient),
                    extra={"worker": self.name, "error": repr(exc), "delay": delay},
                )
                if await self._stopped_within(delay):
                    return await self._settle(message, requeue=True)
                if _channel_closed(message):
                    # The broker has already given it to another consumer (or to us again
                    # after the reconnect): working on this copy too would only race it.
                    log.warning("worker %s dropped a held message: its channel closed", self.name)
                    return "requeued"
                continue
            outcome = await self._settle(message, requeue=None)
            return "retried" if retried and outcome == "acked" else outcome

    async def _stopped_within(self, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()
        return self._stopping.is_set()

    async def _dead_letter(self, message: AbstractIncomingMessage, reason: str) -> str:
        log.error(
            "worker %s dead-lettered message %s: %s",
            self.name,
            message.message_id,
            reason,
            extra={"reason": reason, "message_id": message.message_id},
        )
        return await self._settle(message, requeue=False)

    async def _settle(self, message: AbstractIncomingMessage, *, requeue: bool | None) -> str:
        """Ack (requeue None), reject to the dead-letter queue (False) or return (True)."""
        try:
            async with asyncio.timeout(BROKER_CALL_TIMEOUT_SECONDS):
                if requeue is None:
                    await message.ack()
                    return "acked"
                if requeue:
                    await message.nack(requeue=True)
                    return "requeued"
                await message.reject(requeue=False)
                return "dead_lettered"
        except Exception as exc:
            # The channel it came on is gone; the broker redelivers it, and the effect
            # being idempotent, the second pass changes nothing.
            log.warning("worker %s lost the settle of a message (%r)", self.name, exc)
            return "requeued"


def _channel_closed(message: AbstractIncomingMessage) -> bool:
    try:
        return message.channel.is_closed
    except ChannelInvalidStateError:
        return True


async def run_worker(settings: Settings, name: str, open_effect: EffectFactory) -> None:
    """A worker process: serve metrics if asked, run until SIGTERM or SIGINT."""
    worker = Worker(settings, name, open_effect)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    if settings.worker_metrics_port is not None:
        worker.metrics.serve(settings.worker_metrics_port)
    tune_gc()
    try:
        await worker.run()
    finally:
        worker.metrics.close()
