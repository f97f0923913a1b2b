"""The runner every worker shares: consume the worker's quorum queue, apply the effect to
batches of deliveries, ack after it.

- Deliveries wait in a batch until WORKER_CONCURRENCY of them are there or
  BATCH_LINGER_SECONDS have passed since the first; at most WORKER_CONCURRENCY messages
  are worked on at once, and prefetch (channel QoS) bounds what the broker hands over.
  A batch is decoded and applied by one call of the effect (one INSERT, one script
  run); every message is settled through workers.settler, which acks a batch with one
  frame where it can and never acks past a message still held.
- A malformed message is rejected without requeue: the queue's dead-letter exchange
  moves it to `<queue>.dlq` at once, and a log line says why.
- A failure the effect calls `transient` (a backend unreachable or out of
  resources) is retried with capped exponential backoff while the message is held, for
  as long as it takes: a good message is never dead-lettered. Any other failure is the
  message's own: it is retried until WORKER_MAX_ATTEMPTS attempts (counted here, while
  the message is held; a redelivery starts again), then dead-lettered as poison. The
  messages of a batch that failed are retried together; the others are acked at once.
  A batch that fails for its content is split (batching.split_on_content_failure) so
  that only the bad message pays.
- The loop itself beats (WorkerMetrics.beat) so that liveness fails when it is stuck.
- SIGTERM, the way arq stops: cancel the consumer so nothing new arrives, let the
  batches in hand finish within SHUTDOWN_TIMEOUT_SECONDS (messages waiting for a batch or
  for a retry go back to the queue at once), return the rest, close the connections,
  exit 0.

Delivery is at least once, so every effect must be idempotent: a message whose ack was
lost with the connection comes back and must change nothing the second time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Iterable, Sequence
from contextlib import AsyncExitStack
from typing import TypeVar

from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection

from session_close import tracing
from session_close.amqp import connect
from session_close.events import MalformedEvent, SessionEvent
from session_close.retry import Backoff, Policy
from session_close.runtime import tune_gc
from session_close.settings import Settings
from session_close.topology import WORKERS, Topology
from workers.delivery import Consumer, DeliveredMessage, channel_closed, message_id
from workers.effect import Effect, EffectFactory, event_ids
from workers.metrics import HEARTBEAT_SECONDS, WorkerMetrics
from workers.settler import BROKER_CALL_TIMEOUT_SECONDS, Disposition, Held, Settler

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

RETRY = Policy(first=0.1, cap=5.0)
# A full batch starts at once. At a modest rate a batch waits this long for company: at
# 1,000 events/s, 25 ms instead of 5 ms took each worker from about 25% to 19% of a core
# (a batch's INSERT or script run, its ack frame and its wake-ups shared by more events),
# for 20 ms more end to end against a budget of 250 ms.
BATCH_LINGER_SECONDS = 0.025


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
        self._settler = Settler(self._told)
        self._heartbeat_seconds = heartbeat_seconds
        self._settings = settings
        self._open_effect = open_effect
        self._retry_policy = retry_policy
        self._topology = Topology.from_settings(settings)
        self._batch_size = settings.worker_concurrency
        self._waiting: list[Held] = []  # delivered, not yet in a batch
        self._working = 0  # messages in batches, until each is settled
        self._linger: asyncio.TimerHandle | None = None
        self._batches: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
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
        # The workers' queues, and this one's (the transmitter's is declared by it alone:
        # a queue nobody consumes would only grow).
        await self._topology.declare(channel, tuple(dict.fromkeys((*WORKERS, self.name))))
        assert isinstance(channel, AbstractRobustChannel)
        return channel

    async def _shutdown(self, consumer: Consumer) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(BROKER_CALL_TIMEOUT_SECONDS):
                await consumer.cancel()
        if self._linger is not None:
            self._linger.cancel()
        for held in self._waiting:
            self._settler.settle(held, "requeue")
        self._waiting.clear()
        if self._batches:
            log.info(
                "worker finishing the messages in hand",
                extra={"worker": self.name, "messages": self._working},
            )
            _, late = await asyncio.wait(
                self._batches, timeout=self._settings.shutdown_timeout_seconds
            )
            for task in late:
                task.cancel()  # _run_batch returns its messages to the queue
            if late:
                log.warning(
                    "worker returning unfinished messages",
                    extra={"worker": self.name, "messages": self._working},
                )
                await asyncio.wait(late, timeout=BROKER_CALL_TIMEOUT_SECONDS)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(BROKER_CALL_TIMEOUT_SECONDS * 2):
                await self._settler.drain()

    @staticmethod
    async def _close_connection(connection: AbstractRobustConnection) -> None:
        # Unacked messages go back to the queue when the connection closes, whatever
        # happened to our explicit nacks.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(BROKER_CALL_TIMEOUT_SECONDS):
                await connection.close()

    async def _on_message(self, message: DeliveredMessage) -> None:
        # aiormq runs this in a task per delivery: it only puts the message in a batch.
        held = self._settler.hold(message)
        if self._stopping.is_set():
            self._settler.settle(held, "requeue")
            return
        self._waiting.append(held)
        self._schedule_batch()

    def _schedule_batch(self) -> None:
        """A batch starts once there is room for it (a settled message makes room) and a
        full one waits, or the oldest waiting message has waited BATCH_LINGER_SECONDS."""
        if not self._waiting or self._working >= self._batch_size:
            return
        if len(self._waiting) >= self._batch_size:
            self._start_batch()
        elif self._linger is None:
            waited = time.monotonic() - self._waiting[0].delivered
            self._linger = asyncio.get_running_loop().call_later(
                max(0.0, BATCH_LINGER_SECONDS - waited), self._start_batch
            )

    def _start_batch(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        size = min(self._batch_size - self._working, len(self._waiting))
        if size <= 0 or self._stopping.is_set():
            return
        batch = self._waiting[:size]
        del self._waiting[:size]
        self._working += size
        task = asyncio.get_running_loop().create_task(self._run_batch(batch))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    def _finish(self, helds: Iterable[Held], disposition: Disposition) -> None:
        """Settle messages of a batch; their room goes to the messages waiting."""
        settled = sum(self._settler.settle(held, disposition) for held in helds)
        self._working -= settled
        if settled:
            self._schedule_batch()

    async def _run_batch(self, batch: list[Held]) -> None:
        try:
            await self._work_off(batch)
        except asyncio.CancelledError:
            self._finish(batch, "requeue")  # those not settled yet go back to the queue
            raise
        except Exception:
            # A bug, not a message's fault: its messages go back rather than stay held,
            # which would hold back the acks of every message behind them.
            log.exception("worker failed on a batch; its messages go back to the queue")
            self._finish(batch, "requeue")

    async def _work_off(self, batch: list[Held]) -> None:
        pending: list[tuple[Held, SessionEvent]] = []
        for held in batch:
            try:
                pending.append((held, SessionEvent.decode(held.message.body)))
            except MalformedEvent as exc:
                self._dead_letter(held, "malformed", str(exc))
        # By failing message: its attempts, and those of them that count to poison.
        attempts: dict[Held, tuple[int, int]] = {}
        backoff: Backoff | None = None  # made on the first failure, the rare case
        while pending:
            failures = await self._apply(pending)
            if not failures:
                return
            backoff = backoff or Backoff(self._retry_policy)
            delay = backoff.next_delay()
            pending = [
                (held, event)
                for held, event, exc in failures
                if self._retry_later(held, event, exc, attempts, delay)
            ]
            if pending and await self._stopped_within(delay):
                self._finish((held for held, _ in pending), "requeue")
                return
            pending = [(held, event) for held, event in pending if self._still_ours(held)]

    async def _apply(
        self, pending: list[tuple[Held, SessionEvent]]
    ) -> list[tuple[Held, SessionEvent, BaseException]]:
        """One call of the effect; acks what it did, returns what failed."""
        assert self._effect is not None
        results: Sequence[BaseException | None]
        if tracing.ENABLED:
            results = await self._traced_effect([event for _, event in pending])
        else:
            results = await self._effect_results([event for _, event in pending])
        done: list[Held] = []
        failures = []
        for (held, event), result in zip(pending, results, strict=True):
            if result is None:
                done.append(held)
            elif isinstance(result, MalformedEvent):
                self._dead_letter(held, "malformed", str(result), event)
            else:
                failures.append((held, event, result))
        self._finish(done, "ack")
        return failures

    async def _effect_results(self, events: list[SessionEvent]) -> Sequence[BaseException | None]:
        assert self._effect is not None
        try:
            return await self._effect.apply(events)
        except Exception as exc:
            return [exc] * len(events)

    async def _traced_effect(self, events: list[SessionEvent]) -> Sequence[BaseException | None]:
        """The effect's call with, per event, a consumer span of its handling in the
        event's trace (parent: its traceparent, the close's span) and a child for the
        effect: a batch is one INSERT or script run, so each event's effect span covers
        that one call (its batch size an attribute). Lines the effect logs per event carry
        that event's handling span."""
        tracer = tracing.tracer(__name__)
        handling: dict[str, tracing.Span] = {}
        effects: list[tracing.Span] = []
        for event in events:
            span = tracer.start_span(
                f"{self.name} handle",
                context=tracing.parent_context(event.traceparent),
                kind=tracing.SpanKind.CONSUMER,
                attributes={
                    "messaging.system": "rabbitmq",
                    "messaging.operation.type": "process",
                    "messaging.message.id": event.event_id,
                    "messaging.batch.message_count": len(events),
                },
            )
            handling[event.event_id] = span
            effects.append(
                tracer.start_span(
                    f"{self.name} effect",
                    context=tracing.trace.set_span_in_context(span),
                    attributes={"effect.batch_size": len(events)},
                )
            )
        with tracing.event_spans(handling):
            results = await self._effect_results(events)
        for event, effect, result in zip(events, effects, results, strict=True):
            span = handling[event.event_id]
            if result is not None:
                for failed in (effect, span):
                    failed.set_status(tracing.StatusCode.ERROR, repr(result))
            effect.end()
            span.end()
        return results

    def _retry_later(
        self,
        held: Held,
        event: SessionEvent,
        exc: BaseException,
        attempts: dict[Held, tuple[int, int]],
        delay: float,
    ) -> bool:
        """Count a failed attempt: True when the message is to be tried again after
        `delay`, False when it was dead-lettered as poison."""
        assert self._effect is not None
        transient = self._effect.transient(exc)
        tried, failed = attempts.get(held, (0, 0))
        tried += 1
        if not transient:
            failed += 1
            if failed >= self._settings.worker_max_attempts:
                reason = f"failed {failed} attempts: {type(exc).__name__}: {exc}"
                self._dead_letter(held, "poison", reason, event)
                return False
        attempts[held] = (tried, failed)
        self._settler.retrying(held)
        self.metrics.retried()
        log.warning(
            "worker could not apply event; retrying",
            exc_info=None if transient else exc,
            extra={
                "worker": self.name,
                "error": repr(exc),
                "attempt": tried,
                "delay": delay,
                "transient": transient,
                "failed_attempts": failed,
                **event_ids(event),
            },
        )
        return True

    def _still_ours(self, held: Held) -> bool:
        if not channel_closed(held.message):
            return True
        # The broker has already given it to another consumer (or to us again after the
        # reconnect): working on this copy too would only race it.
        log.warning(
            "worker dropped a held message: its channel closed", extra={"worker": self.name}
        )
        self._finish((held,), "requeue")
        return False

    async def _stopped_within(self, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()
        return self._stopping.is_set()

    def _dead_letter(
        self, held: Held, kind: str, reason: str, event: SessionEvent | None = None
    ) -> None:
        """kind: malformed (at once) or poison (after its attempts); reason: why."""
        log.error(
            "worker dead-lettered a message",
            extra={
                "worker": self.name,
                "dead_letter": kind,
                "reason": reason,
                "message_id": message_id(held.message),
                **(event_ids(event) if event is not None else {}),
            },
        )
        held.dead_letter = kind
        self._finish((held,), "dead_letter")

    def _told(self, frame: list[Held], told: bool) -> None:
        """The settler's report of one frame: the metrics of its messages."""
        now = time.monotonic()
        seconds: dict[str, list[float]] = {}
        for held in frame:
            seconds.setdefault(_outcome(held, told), []).append(now - held.delivered)
        for outcome, durations in seconds.items():
            self.metrics.settled(outcome, durations)
        last = frame[-1]
        if told and last.disposition == "ack":
            self.metrics.ack_frame()
        elif told and last.disposition == "dead_letter":
            self.metrics.dead_lettered(last.dead_letter)


def _outcome(held: Held, told: bool) -> str:
    if not told or held.disposition == "requeue":
        return "requeued"
    if held.disposition == "dead_letter":
        return "dead_lettered"
    return "retried" if held.retrying else "acked"


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
