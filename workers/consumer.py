"""The runner every worker shares: consume the worker's quorum queue, apply the effect,
ack after it.

- Prefetch (channel QoS) bounds what the broker hands over; a semaphore bounds how many
  messages are worked on at once. Every message is settled through workers.settler,
  which coalesces acks without ever acking past a message still held.
- A malformed message is rejected without requeue: the queue's dead-letter exchange
  moves it to `<queue>.dlq` at once, and a log line says why.
- A failure of the effect's `transient` kinds (a backend unreachable or out of
  resources) is retried with capped exponential backoff while the message is held, for
  as long as it takes: a good message is never dead-lettered. Any other failure is the
  message's own: it is retried until WORKER_MAX_ATTEMPTS attempts (counted here, while
  the message is held; a redelivery starts again), then dead-lettered as poison. A batch
  that fails for its content is split (split_on_content_failure) so that only the bad
  message pays.
- The loop itself beats (WorkerMetrics.beat) so that liveness fails when it is stuck.
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
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from typing import Protocol, TypeVar

import structlog
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection

from session_close.amqp import connect
from session_close.events import MalformedEvent, SessionEvent
from session_close.retry import Backoff, Policy
from session_close.runtime import tune_gc
from session_close.settings import Settings
from session_close.topology import Topology
from workers.delivery import Consumer, DeliveredMessage, channel_closed, message_id
from workers.metrics import HEARTBEAT_SECONDS, WorkerMetrics
from workers.settler import BROKER_CALL_TIMEOUT_SECONDS, Disposition, Held, Settler

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

RETRY = Policy(first=0.1, cap=5.0)


class Effect(Protocol):
    """What a worker does with one event. It must be idempotent. It raises MalformedEvent
    for an event it can never act on, one of `transient` when its backend cannot be
    reached or is out of resources, anything else when the event itself failed."""

    transient: tuple[type[BaseException], ...]  # retried without limit, logged without traceback

    async def apply(self, event: SessionEvent) -> None: ...


EffectFactory = Callable[[Settings], AbstractAsyncContextManager[Effect]]


def split_on_content_failure(
    flush: Callable[[list[T]], Awaitable[Sequence[R | BaseException]]],
    transient: tuple[type[BaseException], ...],
) -> Callable[[list[T]], Awaitable[Sequence[R | BaseException]]]:
    """A batch flush that, when the batch fails for something other than its backend,
    flushes each item alone: the items that fail alone get their own error, the others
    their result, so one bad item cannot fail the batch it shared."""

    async def alone(item: T) -> R:
        [result] = await flush([item])
        if isinstance(result, BaseException):
            raise result
        return result

    async def flush_or_split(items: list[T]) -> Sequence[R | BaseException]:
        try:
            return await flush(items)
        except transient:
            raise
        except Exception:
            if len(items) == 1:
                raise
            log.warning("a batch failed for its content; applying its items one by one")
            return await asyncio.gather(*(alone(item) for item in items), return_exceptions=True)

    return flush_or_split


class Worker:
    def __init__(
        self,
        settings: Settings,
        name: str,
        open_effect: EffectFactory,
        *,
        metrics: WorkerMetrics | None = None,
        retry_policy: Policy = RETRY,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
    ) -> None:
        self.name = name
        self.metrics = metrics or WorkerMetrics(name)
        self._settler = Settler(self.metrics)
        self._heartbeat_seconds = heartbeat_seconds
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
        log.info("worker stopping", extra={"worker": self.name})
        self._stopping.set()
        if not self.consuming.is_set() and self._main is not None:
            # Still waiting for a backend at start: nothing in hand, just give up.
            self._main.cancel()

    async def run(self) -> None:
        """Consume until stop(); returns once everything in hand is settled and closed."""
        self._main = asyncio.current_task()
        heartbeat = asyncio.create_task(self._beat())
        try:
            async with AsyncExitStack() as stack:
                self._effect = await stack.enter_async_context(self._open_effect(self._settings))
                connection = await connect(self._settings)
                stack.push_async_callback(self._close_connection, connection)
                channel = await self._declare(connection)
                queue = self._topology.queue(self.name)
                consumer = Consumer(channel, queue, self._on_message)
                await consumer.start()
                self.consuming.set()
                log.info(
                    "worker consuming",
                    extra={
                        "worker": self.name,
                        "queue": queue,
                        "prefetch": self._settings.worker_prefetch,
                        "concurrency": self._settings.worker_concurrency,
                    },
                )
                await self._stopping.wait()
                await self._shutdown(consumer)
        except asyncio.CancelledError:
            if not self._stopping.is_set() or self.consuming.is_set():
                raise
            log.info("worker stopped before it started consuming", extra={"worker": self.name})
        finally:
            heartbeat.cancel()
        log.info("worker stopped", extra={"worker": self.name})

    async def _beat(self) -> None:
        # A task of the loop itself: when the loop is stuck, the beat stops and the
        # liveness check (WorkerMetrics, /healthz) fails.
        while True:
            self.metrics.beat()
            await asyncio.sleep(self._heartbeat_seconds)

    async def _declare(self, connection: AbstractRobustConnection) -> AbstractRobustChannel:
        # A robust channel re-declares all of this, QoS included, after a reconnect (and
        # the Consumer registers itself again).
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=self._settings.worker_prefetch)
        await self._topology.declare(channel)
        assert isinstance(channel, AbstractRobustChannel)
        return channel

    async def _shutdown(self, consumer: Consumer) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(BROKER_CALL_TIMEOUT_SECONDS):
                await consumer.cancel()
        if self._in_hand:
            log.info(
                "worker finishing the messages in hand",
                extra={"worker": self.name, "messages": len(self._in_hand)},
            )
            _, late = await asyncio.wait(
                self._in_hand, timeout=self._settings.shutdown_timeout_seconds
            )
            for task in late:
                task.cancel()  # _on_message returns its message to the queue
            if late:
                log.warning(
                    "worker returning unfinished messages",
                    extra={"worker": self.name, "messages": len(late)},
                )
                await asyncio.wait(late, timeout=BROKER_CALL_TIMEOUT_SECONDS * 2)

    @staticmethod
    async def _close_connection(connection: AbstractRobustConnection) -> None:
        # Unacked messages go back to the queue when the connection closes, whatever
        # happened to our explicit nacks.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(BROKER_CALL_TIMEOUT_SECONDS):
                await connection.close()

    async def _on_message(self, message: DeliveredMessage) -> None:
        held = self._settler.hold(message)  # before any await: in delivery order
        task = asyncio.current_task()
        assert task is not None
        self._in_hand.add(task)
        started = asyncio.get_running_loop().time()
        try:
            outcome = await self._process(held)
        except asyncio.CancelledError:
            await self._settle(held, "requeue")
            self.metrics.settled("requeued", asyncio.get_running_loop().time() - started)
            raise
        finally:
            self._in_hand.discard(task)
        self.metrics.settled(outcome, asyncio.get_running_loop().time() - started)

    async def _process(self, held: Held) -> str:
        if self._stopping.is_set():
            return await self._settle(held, "requeue")
        try:
            event = SessionEvent.decode(held.message.body)
        except MalformedEvent as exc:
            return await self._dead_letter(held, "malformed", str(exc))
        # The event's ids on every line logged about it. Each delivery runs in a task of
        # its own (aiormq's), whose context ends with it: nothing to unbind.
        structlog.contextvars.bind_contextvars(
            request_id=event.request_id, event_id=event.event_id, trace_id=event.trace_id
        )
        async with self._slots:
            if self._stopping.is_set():
                return await self._settle(held, "requeue")
            return await self._apply(held, event)

    async def _apply(self, held: Held, event: SessionEvent) -> str:
        assert self._effect is not None
        transient = self._effect.transient
        backoff: Backoff | None = None  # made on the first failure, the rare case
        attempts = failed_attempts = 0  # failed_attempts: those that count to poison
        retried = False
        while True:
            try:
                await self._effect.apply(event)
            except MalformedEvent as exc:
                return await self._dead_letter(held, "malformed", str(exc))
            except Exception as exc:
                attempts += 1
                if not isinstance(exc, transient):
                    failed_attempts += 1
                    if failed_attempts >= self._settings.worker_max_attempts:
                        return await self._dead_letter(
                            held,
                            "poison",
                            f"failed {failed_attempts} attempts: {type(exc).__name__}: {exc}",
                        )
                retried = True
                self.metrics.retried()
                backoff = backoff or Backoff(self._retry_policy)
                delay = backoff.next_delay()
                log.warning(
                    "worker could not apply event; retrying",
                    exc_info=not isinstance(exc, transient),
                    extra={
                        "worker": self.name,
                        "error": repr(exc),
                        "attempt": attempts,
                        "delay": delay,
                        "transient": isinstance(exc, transient),
                        "failed_attempts": failed_attempts,
                    },
                )
                if await self._stopped_within(delay):
                    return await self._settle(held, "requeue")
                if channel_closed(held.message):
                    # The broker has already given it to another consumer (or to us again
                    # after the reconnect): working on this copy too would only race it.
                    log.warning(
                        "worker dropped a held message: its channel closed",
                        extra={"worker": self.name},
                    )
                    return await self._settle(held, "requeue")
                continue
            outcome = await self._settle(held, "ack")
            return "retried" if retried and outcome == "acked" else outcome

    async def _stopped_within(self, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()
        return self._stopping.is_set()

    async def _dead_letter(self, held: Held, kind: str, reason: str) -> str:
        """kind: malformed (at once) or poison (after its attempts); reason: why."""
        log.error(
            "worker dead-lettered a message",
            extra={
                "worker": self.name,
                "dead_letter": kind,
                "reason": reason,
                "message_id": message_id(held.message),
            },
        )
        outcome = await self._settle(held, "dead_letter")
        if outcome == "dead_lettered":
            self.metrics.dead_lettered(kind)
        return outcome

    async def _settle(self, held: Held, disposition: Disposition) -> str:
        if not await self._settler.settle(held, disposition):
            # The channel it came on is gone; the broker redelivers it, and the effect
            # being idempotent, the second pass changes nothing.
            return "requeued"
        return {"ack": "acked", "dead_letter": "dead_lettered", "requeue": "requeued"}[disposition]


async def run_worker(settings: Settings, name: str, open_effect: EffectFactory) -> None:
    """A worker process: serve metrics if asked, run until SIGTERM or SIGINT."""
    worker = Worker(settings, name, open_effect)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    if settings.worker_metrics_port is not None:
        # Port 0 binds a free one: the line says which.
        port = worker.metrics.serve(settings.worker_metrics_port)
        log.info("serving metrics", extra={"worker": name, "port": port})
    tune_gc()
    try:
        await worker.run()
    finally:
        worker.metrics.close()
