"""The outbox relay: publishes outbox stream entries to RabbitMQ with publisher
confirms and deletes an entry only after the broker confirmed it.

close_sessions.lua appends one entry per close to its bucket's stream (256 of them, the
key layout of docs/redis.md). Relays share the consumer group `relay` of every stream,
and each covers every bucket: it reads new entries, publishes windows of them
concurrently, then XACKs and XDELs the confirmed ones (settle_entries.lua, atomic per
bucket). On a single node (or behind Sentinel) one blocking XREADGROUP reads all 256
streams and one script run settles a window; on Redis Cluster, where one command's keys
must share a slot, each read is one XREADGROUP per bucket (read_outbox.lua) and each
settle one run per bucket, in one pipeline (a round trip to each primary), every
CLUSTER_POLL while the outboxes are empty. An entry whose publish failed stays
pending and is retried by the same relay, which re-reads its own pending entries after
any error it sees and on every heartbeat tick: a reply lost on the way (a timeout)
leaves entries pending that the relay never saw, and they wait at most a tick. Each
relay refreshes a heartbeat key (TTL RELAY_HEARTBEAT_SECONDS) from its event loop; the
entries of a relay whose heartbeat is gone are claimed at once by another
(take_over_relays.lua, per bucket). A relay judged dead that was merely slow may still
publish what it read: delivery is at least once, and the event id (message_id) lets
consumers drop repeats.

An entry that can never become a valid event (a field missing or out of range) is moved
to the dead-letter stream `outbox:dead-letters` with the reason, and the rest of its
batch is published as usual: one bad entry never holds back the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Callable
from typing import Any, cast

import aio_pika
import aiormq
from aio_pika.abc import AbstractExchange, AbstractRobustConnection
from aiormq.exceptions import ChannelInvalidStateError
from pamqp.commands import Basic
from redis.asyncio import Redis
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from outbox.stream import ensure_group
from session_close import tracing
from session_close.events import CONTENT_TYPE, BadEntry, SessionEvent
from session_close.keys import (
    BUCKETS,
    DEAD_LETTER_ENTRY_ID,
    DEAD_LETTER_FIELD,
    DEAD_LETTER_REASON,
    OUTBOX_GROUP,
    Keys,
)
from session_close.redis_client import unavailable
from session_close.replication import hold_replicated
from session_close.retry import Backoff, Policy, pause, retry
from session_close.scripts import (
    READ_OUTBOX,
    SETTLE_ENTRIES,
    TAKE_OVER_RELAYS,
    LuaScript,
    run_each,
)
from session_close.settings import Settings

log = logging.getLogger(__name__)

# An outbox entry: its bucket, its id in the bucket's stream, its fields.
Entry = tuple[int, str, dict[str, str]]
# On Redis Cluster, a relay that found every outbox empty looks again after a pause (it
# cannot block on streams of several slots): 50 ms after a read that found entries,
# doubling while they stay empty up to 400 ms, what an event of a quiet cluster may wait.
# Polling at 50 ms all the time cost an idle relay 15 % of a core (256 reads a poll).
CLUSTER_POLL = Policy(first=0.05, cap=0.4)
# Yield to the event loop after this many publishes, so a large backlog never holds
# the request path for long (a 500-message burst pushed p99 past 20 ms). No more than
# aiormq's write queue holds (10 frames): a publish that finds it full waits for room
# while holding the channel lock, and the publishes queued behind it then go one per
# loop iteration. Under HTTP load (5 ms iterations) 25 gave 167 events/s, 10 gives 758.
PUBLISH_SLICE = 10
RELAY = Policy(first=0.1, cap=5.0)
CHANNEL = Policy(first=1.0, cap=1.0)
PERSISTENT = aio_pika.DeliveryMode.PERSISTENT.value


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Relay:
    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        *,
        on_published: Callable[[int], None] = lambda n: None,
        on_failed: Callable[[int], None] = lambda n: None,
        on_dead_lettered: Callable[[int], None] = lambda n: None,
    ) -> None:
        self._redis = redis
        self._exchange: AbstractExchange | None = None
        self._keys = Keys(settings.redis_key_prefix)
        self._settings = settings
        self._consumer = consumer_name()
        self._heartbeat = self._keys.relay_heartbeat(self._consumer)
        self._on_published = on_published
        self._on_failed = on_failed
        self._on_dead_lettered = on_dead_lettered
        self._retry_own = True  # first look at what this consumer already holds
        self._next_takeover = 0.0
        self._beating: asyncio.Task[None] | None = None
        self._batch_done = asyncio.Event()
        self._batch_done.set()
        self._stopping = False
        # Block well inside the client's socket timeout, which applies to blocking reads
        # too: blocking as long as the timeout made an idle relay time out every second.
        self._block_ms = max(1, int(settings.redis_timeout_seconds * 500))
        self._cluster = settings.redis_cluster
        # On a single node one XREADGROUP reads every bucket (521 arguments, the stream
        # names built once).
        self._buckets = {self._keys.outbox(b): b for b in range(BUCKETS)}
        self._streams = {start: dict.fromkeys(self._buckets, start) for start in (">", "0")}

    async def run(self, exchange: AbstractExchange) -> None:
        self._exchange = exchange
        backoff, idle = Backoff(RELAY), Backoff(CLUSTER_POLL)
        # Quietly: Redis may be down as the relay starts; the loop below retries until
        # it is back (a missing group fails XREADGROUP, which recreates it).
        await self._ensure_group_quietly()
        # Beat before the first read, so no other relay takes this one's entries for a
        # dead relay's.
        with contextlib.suppress(RedisError, OSError):
            await self._beat_once()
        self._beating = asyncio.create_task(self._beat(), name="outbox-relay-heartbeat")
        while not self._stopping:
            try:
                entries = await self._next_entries()
                if not entries:
                    if self._cluster:  # a cluster's reads do not block
                        await idle.sleep()
                    continue
                idle.reset()
                # Publish only what the replicas hold (REDIS_MIN_REPLICAS): an entry lost
                # with its primary must not have gone out, its close's retry gives its event.
                await hold_replicated(self._redis, self._settings, self._heartbeat)
                if not await self._publish_windows(entries):
                    backoff.reset()
                    continue
            except Exception as exc:
                if unavailable(exc):
                    # An outage (unreachable, or refusing writes: MISCONF, OOM...), waited out.
                    log.warning("outbox relay: Redis unavailable", extra={"error": repr(exc)})
                else:
                    log.exception("outbox relay failed; retrying")
                await self._ensure_group_quietly()
            self._retry_own = True
            await backoff.sleep()

    async def stop(self, task: asyncio.Task[None]) -> None:
        """Let the batch in flight get its confirms (bounded), then stop reading."""
        self._stopping = True
        try:
            await asyncio.wait_for(
                self._batch_done.wait(), self._settings.publish_timeout_seconds + 1
            )
        except TimeoutError:
            log.warning("outbox relay stopped with publishes unconfirmed; they stay pending")
        for running in (task, self._beating):
            if running is not None:
                running.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await running
        # Whatever this relay still holds is taken over at once, not after the TTL.
        with contextlib.suppress(RedisError, OSError):
            await self._redis.delete(self._heartbeat)

    async def _beat_once(self) -> None:
        ttl_ms = int(self._settings.relay_heartbeat_seconds * 1000)
        # PEXPIRE needs no memory, so a full Redis (maxmemory reached, noeviction)
        # still takes it, where it refuses SET: a live relay keeps its entries. SET only
        # when the key is gone (the first beat, or after a stall longer than the TTL).
        if not await self._redis.pexpire(self._heartbeat, ttl_ms):
            await self._redis.set(self._heartbeat, "1", px=ttl_ms)

    async def _beat(self) -> None:
        """Refreshed from the event loop, apart from the publishing: a relay whose loop
        stalls stops beating, and another publishes its entries (a repeat at worst)."""
        while True:
            await pause(self._settings.relay_heartbeat_seconds / 3)
            # A lost reply the relay never saw as an error leaves entries in its pending
            # list: the next read looks there first, so they wait a tick, not forever.
            self._retry_own = True
            try:
                await self._beat_once()
            except (RedisError, OSError) as exc:
                log.warning("outbox relay cannot refresh its heartbeat", extra={"error": repr(exc)})

    async def _ensure_group_quietly(self) -> None:
        # A Redis restarted without persistence has lost the stream and its group.
        with contextlib.suppress(RedisError, OSError):
            await ensure_group(self._redis, self._keys)

    async def _next_entries(self) -> list[Entry]:
        loop = asyncio.get_running_loop()
        if loop.time() >= self._next_takeover:
            # Often enough that a dead relay's entries move within a fifth of the TTL
            # after its heartbeat expired.
            self._next_takeover = loop.time() + self._settings.relay_heartbeat_seconds / 5
            claimed = await self._take_over()
            if claimed:
                log.info(
                    "outbox relay took over a dead relay's entries", extra={"entries": len(claimed)}
                )
                return claimed
        own = self._retry_own
        entries = await self._read("0" if own else ">")
        # Only a read of its own that found nothing clears the flag: a heartbeat tick may
        # have set it while a blocking read of new entries was waiting.
        if own and not entries:
            self._retry_own = False
        return entries

    async def _read(self, start: str) -> list[Entry]:
        """Up to RELAY_BATCH_SIZE entries of each outbox: new ones (start ">"), or those
        this relay read before and still holds ("0")."""
        count = self._settings.relay_batch_size
        if not self._cluster:
            # Blocks until any bucket has new entries; reads of its own never block.
            reply: Any = await self._redis.xreadgroup(
                OUTBOX_GROUP,
                self._consumer,
                self._streams[start],  # type: ignore[arg-type]
                count=count,
                block=None if start == "0" else self._block_ms,
            )
            found: list[tuple[int, Any]] = [
                (self._buckets[stream], raw) for stream, raw in reply or []
            ]
        else:
            calls = [
                (READ_OUTBOX, [self._keys.outbox(b)], [OUTBOX_GROUP, self._consumer, count, start])
                for b in range(BUCKETS)
            ]
            replies = await run_each(self._redis, calls)
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply  # a missing group: the caller recreates it
            found = [
                (b, [(entry_id, _pairs(flat) if flat else None) for entry_id, flat in reply])
                for b, reply in enumerate(replies)
            ]
        # XREADGROUP '0' gives a None body for entries deleted meanwhile.
        return [
            (bucket, entry_id, fields)
            for bucket, raw in found
            for entry_id, fields in raw
            if fields
        ]

    async def _take_over(self) -> list[Entry]:
        """Claim the entries of the relays whose heartbeat is gone, in every bucket."""
        pipe = self._redis.pipeline(transaction=False)
        for b in range(BUCKETS):
            pipe.xinfo_consumers(self._keys.outbox(b), OUTBOX_GROUP)
        # A bucket whose group is missing (a Redis restarted empty) has no one to claim.
        found = await pipe.execute(raise_on_error=False)
        consumers = {
            b: {c["name"] for c in info} - {self._consumer}
            for b, info in enumerate(found)
            if not isinstance(info, Exception) and info
        }
        names = sorted(set().union(*consumers.values()))
        if not names:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for name in names:
            pipe.exists(self._keys.relay_heartbeat(name))
        dead = {name for name, alive in zip(names, await pipe.execute(), strict=True) if not alive}
        targets = [(b, sorted(held & dead)) for b, held in consumers.items() if held & dead]
        calls = [
            (
                TAKE_OVER_RELAYS,
                [self._keys.outbox(b)],
                [OUTBOX_GROUP, self._consumer, self._settings.relay_batch_size, *gone],
            )
            for b, gone in targets
        ]
        claimed: list[Entry] = []
        for (bucket, _), result in zip(targets, await run_each(self._redis, calls), strict=True):
            if isinstance(result, Exception):
                raise result
            claimed += [(bucket, entry_id, _pairs(flat)) for entry_id, flat in result]
        return claimed

    async def _publish_windows(self, entries: list[Entry]) -> int:
        """Publish what was read, RELAY_BATCH_SIZE entries at a time (a read of all the
        buckets may bring that many from each); stop at a window that had failures, whose
        entries, and those not yet sent, stay pending for this relay to read again.
        Returns how many failed."""
        window = self._settings.relay_batch_size
        for start in range(0, len(entries), window):
            self._batch_done.clear()
            try:
                failed = await self._publish(entries[start : start + window])
            finally:
                self._batch_done.set()
            if failed or self._stopping:
                return failed
        return 0

    async def _publish(self, entries: list[Entry]) -> int:
        """Publish a window of entries concurrently; return how many failed."""
        exchange = self._exchange
        assert exchange is not None, "run() sets the exchange"
        try:
            # AbstractExchange does not declare the channel aio_pika's Exchange keeps.
            exchange_channel = cast(aio_pika.Exchange, exchange).channel
            if exchange_channel.is_closed:
                raise ChannelInvalidStateError(f"{exchange_channel!r} closed")
            channel = cast(aiormq.Channel, await exchange_channel.get_underlay_channel())
        except Exception as exc:  # the broker is gone; the robust channel comes back
            log.warning(
                "cannot publish; the events stay in the outbox",
                extra={"events": len(entries), "error": repr(exc)},
            )
            self._on_failed(len(entries))
            return len(entries)
        source, timeout = self._settings.event_source, self._settings.publish_timeout_seconds
        sent: list[tuple[int, str]] = []
        confirmations: list[asyncio.Future[Any]] = []
        dead: list[tuple[Entry, BadEntry]] = []
        spans: list[tracing.Span] = []
        for bucket, entry_id, fields in entries:
            try:
                event = SessionEvent.from_outbox(fields)
            except BadEntry as bad:
                dead.append(((bucket, entry_id, fields), bad))  # it can never succeed
                continue
            # Straight to aiormq, with the properties aio_pika.Message would build:
            # through Exchange.publish, aiormq holds the channel lock until each frame is
            # written and drained, so a window of publishes costs a few event-loop
            # iterations per message, and under HTTP load each iteration is milliseconds.
            # wait=False still awaits the broker's confirm; it only skips the drain. The
            # timeout matters: a robust channel's publish waits forever for a broker
            # that is gone.
            publish = channel.basic_publish(
                event.encode(source),
                exchange=exchange.name,
                routing_key=event.type,
                properties=Basic.Properties(
                    content_type=CONTENT_TYPE,
                    message_id=event.event_id,
                    delivery_mode=PERSISTENT,
                    priority=0,
                    message_type=event.type,
                    headers={"x-request-id": event.request_id or ""},
                ),
                mandatory=True,
                timeout=timeout,
                wait=False,
            )
            sent.append((bucket, entry_id))
            confirmations.append(asyncio.ensure_future(publish))
            if tracing.ENABLED:
                spans.append(self._publish_span(event, exchange.name))
            if len(sent) % PUBLISH_SLICE == 0:
                await asyncio.sleep(0)
        results = await asyncio.gather(*confirmations, return_exceptions=True)
        for span, result in zip(spans, results, strict=False):  # none when tracing is off
            if not isinstance(result, Basic.Ack):
                span.set_status(tracing.StatusCode.ERROR, repr(result))
            span.end()
        # Only an Ack counts: a publish returned as unroutable (no queue bound) or
        # failed stays in the outbox, since deleting it would lose the event.
        failures = [r for r in results if not isinstance(r, Basic.Ack)]
        done = [e for e, r in zip(sent, results, strict=True) if isinstance(r, Basic.Ack)]
        if done:
            await self._settle(done)
            self._on_published(len(done))
        if dead:
            # After the acks, apart: XADD needs memory that XACK and XDEL do not, so a
            # full Redis refuses only this step, and only the bad entries are read again.
            await self._set_aside(dead)
        if failures:
            log.warning(
                "publishes failed; the events stay in the outbox",
                extra={"failed": len(failures), "sent": len(sent), "first": repr(failures[0])},
            )
            self._on_failed(len(failures))
        return len(failures)

    @staticmethod
    def _publish_span(event: SessionEvent, exchange: str) -> tracing.Span:
        """A producer span per event, from its publish to the broker's confirm, in the
        event's trace: its parent is the event's traceparent (the close's span). The
        message keeps that traceparent: the CloudEvent's is fixed in the outbox entry, so
        the workers' spans are the publish span's siblings under the close."""
        return tracing.tracer(__name__).start_span(
            f"publish {event.type}",
            context=tracing.parent_context(event.traceparent),
            kind=tracing.SpanKind.PRODUCER,
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.operation.type": "send",
                "messaging.destination.name": exchange,
                "messaging.message.id": event.event_id,
            },
        )

    async def _settle(self, done: list[tuple[int, str]]) -> None:
        """XACK and XDEL the confirmed entries, atomically per bucket: in one script run
        on a single node, in one run per bucket (one pipeline) on a cluster."""
        by_bucket: dict[int, list[str]] = {}
        for bucket, entry_id in done:
            by_bucket.setdefault(bucket, []).append(entry_id)
        runs = [[b] for b in by_bucket] if self._cluster else [list(by_bucket)]
        calls: list[tuple[LuaScript, list[str], list[Any]]] = []
        for buckets in runs:
            args: list[Any] = [OUTBOX_GROUP]
            for b in buckets:
                args += [len(by_bucket[b]), *by_bucket[b]]
            calls.append((SETTLE_ENTRIES, [self._keys.outbox(b) for b in buckets], args))
        for result in await run_each(self._redis, calls):
            if isinstance(result, Exception):
                raise result

    async def _set_aside(self, dead: list[tuple[Entry, BadEntry]]) -> None:
        """Copy entries to the dead-letter stream, with the reason, then remove them from
        their outboxes. Two steps (the dead-letter stream has a slot of its own): a relay
        that dies between them leaves the entries pending, and they are set aside again,
        so a dead letter may be recorded twice, never lost."""
        pipe = self._redis.pipeline(transaction=False)
        for (_, entry_id, fields), bad in dead:
            record: dict[FieldT, EncodableT] = {k: v for k, v in fields.items()}
            record[DEAD_LETTER_REASON] = bad.reason
            record[DEAD_LETTER_FIELD] = bad.field
            record[DEAD_LETTER_ENTRY_ID] = entry_id
            pipe.xadd(self._keys.dead_letters, record)
        await pipe.execute()
        await self._settle([(bucket, entry_id) for (bucket, entry_id, _), _ in dead])
        for (_, entry_id, _), bad in dead:
            # The field and the reason only: the values stay in Redis, out of the logs.
            log.error(
                "outbox entry cannot become an event; set aside as a dead letter",
                extra={"entry_id": entry_id, "field": bad.field, "reason": bad.reason},
            )
        self._on_dead_lettered(len(dead))


def _pairs(flat: list[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


async def open_exchange(
    connection: AbstractRobustConnection, settings: Settings
) -> AbstractExchange:
    """The exchange on a channel of its own with publisher confirms, for a relay."""

    async def attempt() -> AbstractExchange:
        # aiormq raises RuntimeError on a closed link too. The broker may go away between
        # connecting and this: without the retry the relay would be gone for the life of
        # the process.
        channel = await connection.channel(publisher_confirms=True)
        return await channel.get_exchange(settings.amqp_exchange, ensure=False)

    return await retry("opening the outbox relay's channel", attempt, policy=CHANNEL)
