"""The transmitter run (`python -m bench signals`, part of `make bench`): how fast
`python -m signals` delivers to a local webhook receiver, what a delivery costs it in
CPU, and how long a logout takes to reach a receiver at a steady rate of closes.

1. Drain: EVENTS session.closed events wait in the transmitter's queue (declared by the
   bench before they are published, with the relay's body and properties), one webhook
   is registered (a receiver in this process, answering 204 at once), then the
   transmitter starts. Deliveries per second and its CPU per delivery (from /proc) are
   taken from its "worker consuming" line to the last event's receipt: each event is
   recorded in PostgreSQL with its delivery, acked, taken by the delivery loop, signed
   and posted.
2. Latency: the API (relay in-process) and the transmitter run; closes are sent at RATE
   per second for SECONDS, each one's send time kept; the receiver notes when each
   session's event arrives. Close-to-receipt p50 and p99 over every close.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import statistics
import time
from dataclasses import dataclass

import aio_pika
import aiohttp
import asyncpg
import orjson
from aiohttp import web

from bench.client import close_one
from bench.consumer import _publish, _wait_for_line
from bench.report import table
from bench.seed import seed_sessions, seed_tokens, session_id
from bench.stack import Process, Stack, cpu_seconds, free_port, wait_for_port
from session_close.topology import TRANSMITTER, Topology
from signals.admin import webhook_command
from signals.sets import write_new_key

RECEIPT_TIMEOUT_SECONDS = 120.0


@dataclass(frozen=True, slots=True)
class SignalsResult:
    events: int
    deliveries_per_second: float
    us_cpu_per_delivery: float
    rate: float
    closes: int
    p50_ms: float
    p99_ms: float
    max_ms: float


class LocalReceiver:
    """A webhook endpoint on 127.0.0.1: notes when each session's event arrives."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.wanted = 0
        self.all_arrived = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/hook"

    def expect(self, count: int) -> None:
        self.arrived.clear()
        self.wanted = count
        self.all_arrived.clear()

    async def _hook(self, request: web.Request) -> web.Response:
        event = orjson.loads(await request.read())
        self.arrived.setdefault(event["data"]["sessionId"], time.monotonic())
        if len(self.arrived) >= self.wanted:
            self.all_arrived.set()
        return web.Response(status=204)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def _transmitter_settings(stack: Stack) -> dict[str, str]:
    port = free_port()
    key = stack.workdir / "signing.pem"
    write_new_key(str(key))
    return {
        "SIGNALS_HTTP_HOST": "127.0.0.1",
        "SIGNALS_HTTP_PORT": str(port),
        "SIGNALS_ISSUER": f"http://127.0.0.1:{port}",
        "SIGNALS_ALLOW_HTTP": "true",
        "SIGNALS_SIGNING_KEY_FILES": str(key),
        "SIGNALS_DB_SCHEMA": f"bench_signals_{stack.run_id}",
    }


async def run(stack: Stack, *, events: int, rate: float, seconds: float) -> SignalsResult:
    env = _transmitter_settings(stack)
    settings = dataclasses.replace(
        stack.settings, signals_allow_http=True, signals_db_schema=env["SIGNALS_DB_SCHEMA"]
    )
    receiver = LocalReceiver()
    await receiver.start()
    try:
        await webhook_command(settings, "add", url=receiver.url, events="session.closed")
        await _declare_queue(stack)

        # 1. Drain.
        await _publish(stack, 0, events)
        receiver.expect(events)
        transmitter = stack.start(TRANSMITTER, ["-m", "signals"], stack.env(env))
        await _wait_for_line(transmitter, "worker consuming")
        started, cpu_started = time.monotonic(), cpu_seconds(transmitter.pid)
        await _arrival(receiver, transmitter)
        drained, cpu = time.monotonic() - started, cpu_seconds(transmitter.pid) - cpu_started
        await wait_for_port(transmitter, int(env["SIGNALS_HTTP_PORT"]))

        # 2. Close-to-receipt latency at a steady rate.
        closes = int(rate * seconds)
        await seed_tokens(stack.redis, stack.keys, stack.run_id)
        await seed_sessions(stack.redis, stack.keys, stack.run_id, events, closes)
        await stack.start_api()
        receiver.expect(closes)
        sent = await _paced_closes(stack, first=events, count=closes, rate=rate)
        await _arrival(receiver, transmitter)
        latencies = sorted(
            (receiver.arrived[session_id(stack.run_id, i)] - at) * 1000 for i, at in sent.items()
        )
    finally:
        await receiver.stop()
        await _clean_up(stack, settings.signals_db_schema)
    return SignalsResult(
        events=events,
        deliveries_per_second=events / drained,
        us_cpu_per_delivery=cpu / events * 1e6,
        rate=rate,
        closes=closes,
        p50_ms=statistics.median(latencies),
        p99_ms=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        max_ms=latencies[-1],
    )


async def _declare_queue(stack: Stack) -> None:
    connection = await aio_pika.connect(stack.settings.amqp_url, timeout=10)
    async with connection:
        await Topology.from_settings(stack.settings).declare(
            await connection.channel(), (TRANSMITTER,)
        )


async def _arrival(receiver: LocalReceiver, transmitter: Process) -> None:
    deadline = time.monotonic() + RECEIPT_TIMEOUT_SECONDS
    while not receiver.all_arrived.is_set():
        transmitter.check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{len(receiver.arrived)} of {receiver.wanted} deliveries arrived "
                f"within {RECEIPT_TIMEOUT_SECONDS}s"
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(receiver.all_arrived.wait(), 0.5)


async def _paced_closes(stack: Stack, *, first: int, count: int, rate: float) -> dict[int, float]:
    """Close sessions first..first+count-1 at `rate` per second; each one's send time."""
    sent: dict[int, float] = {}
    start = time.monotonic()
    async with aiohttp.ClientSession() as http:

        async def close(i: int) -> None:
            sent[i] = time.monotonic()
            if await close_one(http, stack.url, stack.run_id, i) != "success":
                raise RuntimeError(f"close {i} did not succeed")

        tasks = []
        for n in range(count):
            await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))
            tasks.append(asyncio.create_task(close(first + n)))
        await asyncio.gather(*tasks)
    return sent


async def _clean_up(stack: Stack, schema: str) -> None:
    topology = Topology.from_settings(stack.settings)
    with contextlib.suppress(Exception):
        connection = await aio_pika.connect(stack.settings.amqp_url, timeout=10)
        async with connection:
            channel = await connection.channel()
            for queue in (topology.queue(TRANSMITTER), topology.dead_letter_queue(TRANSMITTER)):
                await channel.queue_delete(queue)
    with contextlib.suppress(Exception):
        db = await asyncpg.connect(stack.settings.database_url, timeout=10)
        try:
            await db.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await db.close()


def render(r: SignalsResult) -> str:
    return "\n".join(
        [
            "",
            f"Transmitter: {r.events:,} events drained to one local webhook; then closes at "
            f"{r.rate:.0f}/s for {r.closes / r.rate:.0f} s, close sent to webhook received",
            table(
                ["", "value"],
                [
                    ["deliveries/s (drain)", f"{r.deliveries_per_second:,.0f}"],
                    ["CPU per delivery (drain)", f"{r.us_cpu_per_delivery:,.0f} µs"],
                    [f"close-to-receipt p50 ({r.closes:,} closes)", f"{r.p50_ms:,.1f} ms"],
                    ["close-to-receipt p99", f"{r.p99_ms:,.1f} ms"],
                    ["close-to-receipt max", f"{r.max_ms:,.1f} ms"],
                ],
            ),
        ]
    )
