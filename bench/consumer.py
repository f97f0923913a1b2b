"""The consumer run: CPU per event of a bare aio-pika consumer (the anchor) and of both
workers, each draining the same events from a quorum queue of the run's own.

Each round publishes N session.closed CloudEvents, as the relay makes them (same body and
properties, persistent, confirmed), to the run's exchange, which routes one copy to each
worker's queue and one to the anchor's queue. Then, one process at a time (so that they
never compete for a core): the anchor (`python -m bench.consumer QUEUE N`: prefetch 100,
orjson decode, one ack per message), `python -m workers audit` and
`python -m workers push-cleanup` start on their full queue and drain it, each once
RabbitMQ has gone quiet after the publishes, in an order that rotates from round to
round (the first drain after a burst of publishes shared the machine with the broker's
own writing). A process's CPU from /proc when it says it is consuming (its start-up
cost) is subtracted from its CPU once its last effect is visible (the anchor's count,
the audit rows, the push tokens gone). The workers' ratios to the anchor are taken per
round; the table gives every round and the medians.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import aio_pika
import asyncpg
import orjson
from pamqp.commands import Basic

from bench.cpu import quiet
from bench.report import table, verdict
from bench.seed import USERS, seed_sessions, session_id, user_id
from bench.stack import Process, Stack, cpu_seconds
from session_close.events import SessionEvent
from session_close.topology import ROUTING_KEYS, Topology

log = logging.getLogger(__name__)

PREFETCH = 100
TARGET_RATIO = 0.8
DRAIN_TIMEOUT_SECONDS = 180.0
PUBLISH_WINDOW = 1000
# After the last effect is visible, the worker's last ack frames are a moment away.
SETTLE_SECONDS = 0.3
KINDS = ("anchor", "audit", "push-cleanup")


@dataclass(frozen=True, slots=True)
class Round:
    us_per_event: dict[str, float]  # by consumer
    seconds: dict[str, float]  # wall time of each drain

    def ratio(self, kind: str) -> float:
        return self.us_per_event[kind] / self.us_per_event["anchor"]


def _event(run_id: str, i: int) -> SessionEvent:
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return SessionEvent(
        event_id=str(uuid.uuid4()),
        session_id=session_id(run_id, i),
        user_id=user_id(i),
        closed_at=now,
        os="Android",
        app_version="1.0.10",
        request_id=uuid.uuid4().hex,
    )


async def _publish(stack: Stack, first: int, count: int) -> None:
    """count events for sessions first.., published with the relay's properties."""
    source = stack.settings.event_source
    connection = await aio_pika.connect(stack.settings.amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()  # publisher confirms on
        underlay = await channel.get_underlay_channel()
        for start in range(first, first + count, PUBLISH_WINDOW):
            confirms = []
            for i in range(start, min(start + PUBLISH_WINDOW, first + count)):
                event = _event(stack.run_id, i)
                confirms.append(
                    underlay.basic_publish(
                        event.encode(source),
                        exchange=stack.settings.amqp_exchange,
                        routing_key=event.type,
                        properties=Basic.Properties(
                            content_type="application/cloudevents+json",
                            message_id=event.event_id,
                            delivery_mode=2,
                            priority=0,
                            message_type=event.type,
                            headers={"x-request-id": event.request_id or ""},
                        ),
                        mandatory=True,
                    )
                )
            results = await asyncio.gather(*confirms)
            if not all(isinstance(r, Basic.Ack) for r in results):
                raise RuntimeError("a publish was not confirmed")


async def _declare(stack: Stack) -> str:
    """The run's topology and the anchor's own quorum queue; returns the anchor's name."""
    topology = Topology.from_settings(stack.settings)
    anchor = f"{stack.settings.amqp_queue_prefix}anchor"
    connection = await aio_pika.connect(stack.settings.amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        exchange = await topology.declare(channel)
        queue = await channel.declare_queue(
            anchor, durable=True, arguments={"x-queue-type": "quorum"}
        )
        for key in ROUTING_KEYS:
            await queue.bind(exchange, key)
    return anchor


async def _delete_queue(stack: Stack, name: str) -> None:
    connection = await aio_pika.connect(stack.settings.amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(name)


async def _wait_for_line(process: Process, text: str, within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    needle = text.encode()
    while needle not in process.log_path.read_bytes():
        process.check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{process.name} did not log {text!r} within {within}s")
        await asyncio.sleep(0.005)


async def _drain(
    stack: Stack,
    kind: str,
    args: list[str],
    ready: str,
    done: Callable[[], Awaitable[bool]],
) -> tuple[float, float]:
    """Start one consumer on its full queue; (CPU seconds after start-up, wall seconds)."""
    process = stack.start(kind, args)
    try:
        await _wait_for_line(process, ready)
        startup = cpu_seconds(process.pid)
        began = time.monotonic()
        deadline = began + DRAIN_TIMEOUT_SECONDS
        while not await done():
            process.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{kind} did not drain its queue")
            await asyncio.sleep(0.05)
        wall = time.monotonic() - began
        await asyncio.sleep(SETTLE_SECONDS)
        return cpu_seconds(process.pid) - startup, wall
    finally:
        stack.stop(process)


async def run(stack: Stack, *, events: int, rounds: int) -> list[Round]:
    anchor_queue = await _declare(stack)
    db = await asyncpg.connect(stack.settings.database_url, timeout=10)
    results = []
    try:
        for r in range(rounds):
            first = r * events
            await seed_sessions(stack.redis, stack.keys, stack.run_id, first, events, push=True)
            await _publish(stack, first, events)
            base_rows = (
                await db.fetchval(f'SELECT count(*) FROM "{stack.settings.audit_table}"')
                if r
                else 0
            )

            async def anchor_done() -> bool:
                return b"consumed all" in (stack.workdir / "anchor.log").read_bytes()

            async def audit_done(base_rows: int = base_rows) -> bool:
                rows: int = await db.fetchval(
                    f'SELECT count(*) FROM "{stack.settings.audit_table}"'
                )
                return rows - base_rows >= events

            async def push_done() -> bool:
                pipe = stack.redis.pipeline(transaction=False)
                for u in range(USERS):
                    pipe.hlen(stack.keys.user_push(user_id(u)))
                left: int = sum(await pipe.execute())
                return left == 0

            drains = [
                (
                    "anchor",
                    ["-m", "bench.consumer", anchor_queue, str(events)],
                    "consuming",
                    anchor_done,
                ),
                ("audit", ["-m", "workers", "audit"], "worker consuming", audit_done),
                (
                    "push-cleanup",
                    ["-m", "workers", "push-cleanup"],
                    "worker consuming",
                    push_done,
                ),
            ]
            # Each round in another order, so that no consumer always drains first.
            drains = drains[r % len(drains) :] + drains[: r % len(drains)]
            cpu: dict[str, float] = {}
            wall: dict[str, float] = {}
            for kind, args, ready, done in drains:
                await quiet("beam.smp")
                cpu[kind], wall[kind] = await _drain(stack, kind, args, ready, done)
            result = Round({k: cpu[k] / events * 1e6 for k in KINDS}, wall)
            log.info(
                "consumer round",
                extra={
                    "round": r + 1,
                    **{f"{k}_us": round(v) for k, v in result.us_per_event.items()},
                },
            )
            results.append(result)
    finally:
        await db.close()
        await _delete_queue(stack, anchor_queue)
    return results


def render(rounds: list[Round], events: int) -> str:
    headers = ["consumer", *[f"round {i + 1} us/ev" for i in range(len(rounds))]]
    headers += ["median us/ev", "x anchor (median)"]
    rows: list[list[object]] = []
    medians: dict[str, float] = {}
    for kind in KINDS:
        per_round = [r.us_per_event[kind] for r in rounds]
        ratio = statistics.median(r.ratio(kind) for r in rounds)
        medians[kind] = ratio
        name = "bare aio-pika (anchor)" if kind == "anchor" else f"worker {kind}"
        rows.append([name, *per_round, statistics.median(per_round), f"{ratio:.2f}"])
    checks: list[list[object]] = [
        [
            f"{kind} CPU per event / anchor's",
            f"{medians[kind]:.2f}",
            f"<= {TARGET_RATIO}",
            verdict(medians[kind] <= TARGET_RATIO),
        ]
        for kind in KINDS[1:]
    ]
    drains = "; ".join(
        f"{kind} {statistics.median(r.seconds[kind] for r in rounds):.1f} s" for kind in KINDS
    )
    notes = (
        f"{events:,} events per round, drained by one process at a time from a full quorum "
        f"queue; CPU from /proc, start-up excluded; x anchor is the median of the rounds' "
        f"ratios. Median drain time: {drains}."
    )
    checked = table(["measure", "value", "target", ""], checks)
    return f"{table(headers, rows)}\n\n{checked}\n\n{notes}"


async def consume(queue_name: str, count: int, amqp_url: str) -> None:
    """The anchor: the plainest aio-pika consumer, one ack per message."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=PREFETCH)
        queue = await channel.declare_queue(queue_name, passive=True)
        seen = 0
        finished = asyncio.Event()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal seen
            orjson.loads(message.body)
            await message.ack()
            seen += 1
            if seen == count:
                finished.set()

        await queue.consume(on_message)
        print("consuming", flush=True)
        await finished.wait()
        print("consumed all", flush=True)
        await asyncio.Event().wait()  # until SIGTERM, so that its CPU can still be read


def main() -> None:
    import os
    import signal

    import uvloop

    queue_name, count = sys.argv[1], int(sys.argv[2])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvloop.run(consume(queue_name, count, os.environ["AMQP_URL"]))


if __name__ == "__main__":
    main()
