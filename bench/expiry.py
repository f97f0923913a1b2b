"""The expiry run: how fast the sweeper works off a backlog, what that does to closes,
and how soon after a session's expires_at its session.expired event is in RabbitMQ.

1. A backlog of BACKLOG sessions that expired while no sweeper ran is seeded. Closes are
   sent at a fixed rate with wrk against an API whose sweeper is off (the baseline),
   then against one whose sweeper works the backlog off while the closes run; the sweep
   throughput is the backlog over the time until the expiry index is empty (the API's
   relay publishing the events as they come).
2. Sessions expiring over the next seconds (LIVE of them, spread evenly) are written the
   way the login side writes them; a queue of the bench's own, bound to session.expired,
   takes their events, and each event's arrival is compared with its data.expiredAt.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import datetime

import aio_pika
import orjson

from bench.report import table, verdict
from bench.seed import USERS, seed_sessions, seed_tokens, user_id
from bench.stack import Stack, wait_for_port, wait_until
from bench.wrk import WrkResult, run_wrk
from session_close.events import EXPIRED
from session_close.keys import bucket_of

log = logging.getLogger(__name__)

BACKLOG = 100_000
LIVE = 2_000
LIVE_SPREAD_SECONDS = 20.0
CHUNK = 2_000


@dataclass(frozen=True, slots=True)
class ExpiryResult:
    backlog: int
    timed: int  # the part of the backlog the timing saw swept
    sweep_seconds: float
    baseline: WrkResult
    sweep_relay_off: WrkResult
    during_sweep: WrkResult
    live: int
    received: int
    delay_p50_ms: float
    delay_p99_ms: float
    delay_max_ms: float
    interval: float
    batch: int

    @property
    def sweep_rate(self) -> float:
        return self.timed / self.sweep_seconds


async def seed_expired(stack: Stack, count: int, *, expires_at: list[float]) -> None:
    """Sessions "e<run>-<i>" written the new way, whose logical end is expires_at[i]."""
    keys = stack.keys
    for start in range(0, count, CHUNK):
        pipe = stack.redis.pipeline(transaction=False)
        for i in range(start, min(start + CHUNK, count)):
            sid, uid = f"e{stack.run_id}-{i}", user_id(i % USERS)
            pipe.hset(
                keys.session(uid, sid),
                mapping={"user_id": uid, "os": "iOS", "expires_at": expires_at[i]},
            )
            pipe.expire(keys.session(uid, sid), 3600)
            pipe.sadd(keys.user_sessions(uid), sid)
            pipe.zadd(keys.expiry(bucket_of(uid)), {sid: expires_at[i]})
        await pipe.execute()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


async def run(stack: Stack, *, rate: float, seconds: float, connections: int) -> ExpiryResult:
    settings = stack.settings
    window = int(rate * seconds * 1.2)  # sessions per wrk run, with room to spare
    await seed_tokens(stack.redis, stack.keys, stack.run_id)
    await seed_sessions(stack.redis, stack.keys, stack.run_id, 0, 3 * window)

    async def closes(first: int) -> WrkResult:
        return await run_wrk(
            stack.url,
            seconds=seconds,
            connections=connections,
            run_id=stack.run_id,
            first=first,
            count=window,
            rate=rate,
        )

    async def index_empty() -> bool:
        return await stack.expiry_size() == 0

    # Baseline: closes with no sweeper.
    api = stack.start("api", ["-m", "service"], stack.env({"SWEEPER_ENABLED": "false"}))
    await wait_for_port(api, settings.http_port)
    baseline = await closes(0)
    stack.stop(api)

    # The sweep alone: the API sweeps a backlog while closes run, its events staying in
    # the outbox (no relay).
    await seed_expired(stack, BACKLOG, expires_at=[time.time() - 60] * BACKLOG)
    api = stack.start("api", ["-m", "service"], stack.env({"RELAY_ENABLED": "false"}))
    await wait_for_port(api, settings.http_port)
    load = asyncio.create_task(closes(window))
    await wait_until("the backlog to be swept", index_empty, within=300, interval=0.02)
    sweep_relay_off = await load
    stack.stop(api)
    await stack.redis.delete(*stack.keys.outboxes)

    # The whole path: the sweeper works the backlog off and the relay publishes it.
    await seed_expired(stack, BACKLOG, expires_at=[time.time() - 60] * BACKLOG)
    api = stack.start("api", ["-m", "service"])
    await wait_for_port(api, settings.http_port)
    # Timed from here: the sweeper may have begun while the API was starting.
    started, due = time.monotonic(), await stack.expiry_size()
    load = asyncio.create_task(closes(2 * window))
    await wait_until("the backlog to be swept", index_empty, within=300, interval=0.02)
    sweep_seconds = time.monotonic() - started
    during_sweep = await load
    await wait_until("the outbox to drain", stack.outbox_empty, within=300)

    # Live expiries: their events, as RabbitMQ hands them to a consumer.
    connection = await aio_pika.connect(settings.amqp_url, timeout=10)
    delays: list[float] = []
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(settings.amqp_exchange)
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(exchange, EXPIRED)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            arrived = time.time()
            expired_at = orjson.loads(message.body)["data"]["expiredAt"]
            delays.append(arrived - datetime.fromisoformat(expired_at).timestamp())
            await message.ack()

        await queue.consume(on_message)
        start = time.time() + 2
        spread = [start + LIVE_SPREAD_SECONDS * i / LIVE for i in range(LIVE)]
        await seed_expired(stack, LIVE, expires_at=spread)

        async def all_received() -> bool:
            return len(delays) >= LIVE

        await wait_until("every live expiry's event", all_received, within=120)
    stack.stop(api)
    return ExpiryResult(
        backlog=BACKLOG,
        timed=due,
        sweep_seconds=sweep_seconds,
        baseline=baseline,
        sweep_relay_off=sweep_relay_off,
        during_sweep=during_sweep,
        live=LIVE,
        received=len(delays),
        delay_p50_ms=percentile(delays, 0.50) * 1000,
        delay_p99_ms=percentile(delays, 0.99) * 1000,
        delay_max_ms=max(delays) * 1000,
        interval=settings.sweep_interval_seconds,
        batch=settings.sweep_batch_size,
    )


def render(r: ExpiryResult) -> str:
    closes = table(
        ["closes at a fixed rate", "requests", "req/s", "p50 ms", "p99 ms", "non-2xx"],
        [
            [label, w.requests, w.rate, w.p50_ms, w.p99_ms, w.non_2xx + w.socket_errors]
            for label, w in (
                ("no sweeper (baseline)", r.baseline),
                (f"sweeping a {r.backlog:,} backlog, relay off", r.sweep_relay_off),
                (f"sweeping a {r.backlog:,} backlog, relay on", r.during_sweep),
            )
        ],
    )
    bound_ms = (r.interval + 2) * 1000
    summary = table(
        ["measure", "value", "target"],
        [
            ["sweep throughput (expired sessions/s into the outbox)", r.sweep_rate, "-"],
            [f"{r.timed:,} of the backlog swept in (s)", r.sweep_seconds, "-"],
            ["expires_at -> event in RabbitMQ, p50 (ms)", r.delay_p50_ms, "-"],
            [
                "expires_at -> event in RabbitMQ, p99 (ms)",
                r.delay_p99_ms,
                f"<= {bound_ms:,.0f} {verdict(r.delay_p99_ms <= bound_ms)}",
            ],
            ["expires_at -> event in RabbitMQ, max (ms)", r.delay_max_ms, "-"],
            [
                "live expiries with their event",
                f"{r.received:,} of {r.live:,}",
                verdict(r.received == r.live),
            ],
        ],
    )
    knobs = f"(SWEEP_INTERVAL_SECONDS={r.interval:g}, SWEEP_BATCH_SIZE={r.batch})"
    return f"{closes}\n\n{summary}\n{knobs}"
