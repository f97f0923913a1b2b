"""Standard Webhooks delivery by the transmitter, as a receiver verifies it: every
session event posted as its CloudEvent, signed so that the official `standardwebhooks`
library verifies it, retried as the contract says, and never delaying another receiver."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable

import asyncpg
from aiohttp import web

from session_close.events import EXPIRED, SessionEvent
from session_close.settings import Settings
from tests.conftest import through
from tests.signals.conftest import Receiver, Transmitter, register
from tests.support.proxy import TcpProxy
from tests.support.waiting import wait_until
from tests.support.workers import Broker, make_event

StartReceiver = Callable[..., Awaitable[Receiver]]


def expired_event(n: int) -> SessionEvent:
    event = make_event(n)
    return dataclasses.replace(event, type=EXPIRED, reason="expired", expired_at=event.closed_at)


async def deliveries(settings: Settings, webhook_id: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(settings.database_url)
    try:
        return list(
            await conn.fetch(
                f"""SELECT event_id::text, state, attempts, last_status, last_error
                FROM "{settings.signals_db_schema}".deliveries
                WHERE webhook_id = $1::uuid ORDER BY id""",
                webhook_id,
            )
        )
    finally:
        await conn.close()


async def test_every_session_event_reaches_a_webhook_as_its_cloudevent_signed_to_verify(
    settings: Settings,
    receivers: StartReceiver,
    transmitters: list[Transmitter],
    signals_queue: Broker,
) -> None:
    everything = await receivers()
    closes_only = await receivers()
    await register(settings, everything)
    await register(settings, closes_only, "session.closed")
    transmitters.append(await Transmitter.start(settings))
    closed, expired = make_event(1), expired_event(2)
    await signals_queue.publish(closed, expired)

    await wait_until(lambda: len(everything.received) == 2, "both events at the first webhook")
    await wait_until(lambda: len(closes_only.received) == 1, "the close at the second")
    bodies = {r.webhook_id: r.body for r in everything.received}
    for event in (closed, expired):
        # webhook-id is the event id; the body is the CloudEvent as the relay publishes it.
        assert bodies[event.event_id] == event.to_cloudevent(settings.event_source)
    assert closes_only.ids() == [closed.event_id]
    assert everything.refused == closes_only.refused == []
    assert all(abs(r.timestamp - r.at) < 5 for r in everything.received)


async def test_a_receiver_down_for_a_while_gets_every_event_once_it_is_back(
    settings: Settings,
    receivers: StartReceiver,
    transmitters: list[Transmitter],
    signals_queue: Broker,
    report_counts: Callable[..., None],
) -> None:
    down_until = time.monotonic() + 10

    async def down_then_up(request: web.Request, attempt: int) -> web.StreamResponse:
        return web.Response(status=503 if time.monotonic() < down_until else 200)

    receiver = await receivers(down_then_up)
    webhook_id = await register(settings, receiver)
    transmitters.append(await Transmitter.start(settings))
    events = [make_event(n) for n in range(20)]
    await signals_queue.publish(*events)

    await wait_until(
        lambda: len(receiver.accepted()) >= 20, "every event accepted after the outage", within=60
    )
    assert sorted(receiver.accepted()) == sorted(e.event_id for e in events)

    async def all_delivered() -> bool:
        rows = await deliveries(settings, webhook_id)
        return len(rows) == 20 and all(row["state"] == "delivered" for row in rows)

    await wait_until(all_delivered, "every delivery recorded as made")
    rows = await deliveries(settings, webhook_id)
    report_counts(
        events=len(events),
        attempts=len(receiver.ids()),
        accepted=len(receiver.accepted()),
        distinct_ids=len(set(receiver.accepted())),
    )
    assert min(row["attempts"] for row in rows) >= 2  # each was refused while down


async def test_a_400_is_not_retried_and_leaves_the_other_receivers_alone(
    settings: Settings,
    receivers: StartReceiver,
    transmitters: list[Transmitter],
    signals_queue: Broker,
    report_counts: Callable[..., None],
) -> None:
    async def bad_request(request: web.Request, attempt: int) -> web.StreamResponse:
        return web.Response(status=400, text="unknown event type")

    refusing = await receivers(bad_request)
    healthy = await receivers()
    refusing_id = await register(settings, refusing)
    await register(settings, healthy)
    transmitters.append(await Transmitter.start(settings))
    events = [make_event(n) for n in range(5)]
    await signals_queue.publish(*events)

    await wait_until(lambda: len(healthy.received) == 5, "every event at the healthy receiver")

    async def all_failed() -> bool:
        rows = await deliveries(settings, refusing_id)
        return len(rows) == 5 and all(row["state"] == "failed" for row in rows)

    await wait_until(all_failed, "the refused deliveries marked failed")
    await asyncio.sleep(3)  # longer than the first backoff: a retry would have come by now
    report_counts(
        events=len(events), attempts_at_400=len(refusing.ids()), healthy=len(healthy.received)
    )
    assert sorted(refusing.ids()) == sorted(e.event_id for e in events)  # one attempt each
    rows = await deliveries(settings, refusing_id)
    assert {(row["attempts"], row["last_status"], row["last_error"]) for row in rows} == {
        (1, 400, "unknown event type")
    }


async def test_a_429_is_retried_no_sooner_than_its_retry_after(
    settings: Settings,
    receivers: StartReceiver,
    transmitters: list[Transmitter],
    signals_queue: Broker,
) -> None:
    async def slow_down_once(request: web.Request, attempt: int) -> web.StreamResponse:
        if attempt == 1:
            return web.Response(status=429, headers={"Retry-After": "3"})
        return web.Response(status=200)

    receiver = await receivers(slow_down_once)
    await register(settings, receiver)
    transmitters.append(await Transmitter.start(settings))
    event = make_event(1)
    await signals_queue.publish(event)

    await wait_until(lambda: len(receiver.received) == 2, "the retry after the 429", within=30)
    first, second = receiver.received
    assert first.webhook_id == second.webhook_id == event.event_id
    assert second.at - first.at >= 3 - 0.1  # the backoff alone would be about 1 s


async def test_a_hanging_receiver_does_not_delay_a_healthy_one(
    settings: Settings,
    receivers: StartReceiver,
    transmitters: list[Transmitter],
    signals_queue: Broker,
    report_counts: Callable[..., None],
) -> None:
    async def hang(request: web.Request, attempt: int) -> web.StreamResponse:
        await asyncio.sleep(60)  # past the transmitter's attempt timeout
        return web.Response(status=200)

    hanging = await receivers(hang)
    healthy = await receivers()
    await register(settings, hanging)
    await register(settings, healthy)
    transmitters.append(await Transmitter.start(settings))
    published: dict[str, float] = {}
    for n in range(10):
        event = make_event(n)
        published[event.event_id] = time.time()
        await signals_queue.publish(event)
        await asyncio.sleep(0.5)

    await wait_until(lambda: len(healthy.received) == 10, "every event at the healthy receiver")
    latencies = sorted(r.at - published[r.webhook_id] for r in healthy.received)
    report_counts(
        healthy=len(healthy.received),
        healthy_max_ms=round(latencies[-1] * 1000, 1),
        hanging_attempts=len(hanging.received),
    )
    # The recording replica wakes its delivery loop: each arrives within milliseconds;
    # 2 s is the contract's bound.
    assert latencies[-1] < 2.0, latencies
    assert hanging.received, "the hanging receiver was tried meanwhile"


async def test_a_transmitter_killed_mid_delivery_leaves_it_to_the_next_with_the_same_id(
    settings: Settings,
    receivers: StartReceiver,
    transmitters: list[Transmitter],
    signals_queue: Broker,
    report_counts: Callable[..., None],
) -> None:
    first_attempt = asyncio.Event()

    async def hold_the_first(request: web.Request, attempt: int) -> web.StreamResponse:
        if attempt == 1:
            first_attempt.set()
            await asyncio.sleep(30)
        return web.Response(status=200)

    receiver = await receivers(hold_the_first)
    await register(settings, receiver)
    first = await Transmitter.start(settings)
    transmitters.append(first)
    event = make_event(1)
    await signals_queue.publish(event)
    await asyncio.wait_for(first_attempt.wait(), 15)
    first.kill()
    killed_at = time.time()
    transmitters.append(await Transmitter.start(settings))

    await wait_until(lambda: len(receiver.received) == 2, "the delivery made again", within=20)
    assert receiver.ids() == [event.event_id, event.event_id]
    report_counts(
        attempts=len(receiver.ids()),
        seconds_to_redelivery=round(receiver.received[1].at - killed_at, 1),
    )
    # Due again once the dead replica's lease ends (8 s): resumed within 10 s.
    assert receiver.received[1].at - killed_at < 10 + 1


async def test_postgres_cut_then_the_transmitter_killed_loses_no_event(
    settings: Settings,
    receivers: StartReceiver,
    transmitters: list[Transmitter],
    signals_queue: Broker,
    postgres_proxy: TcpProxy,
    report_counts: Callable[..., None],
) -> None:
    """Events taken from the queue while PostgreSQL is cut are held, not acked: the
    transmitter killed then, they go back to the queue and reach the next one."""
    receiver = await receivers()
    await register(settings, receiver)
    proxied = dataclasses.replace(
        settings, database_url=through(settings.database_url, postgres_proxy)
    )
    first = await Transmitter.start(proxied)
    transmitters.append(first)
    events = [make_event(n) for n in range(60)]
    await signals_queue.publish(*events[:20])
    await wait_until(lambda: len(receiver.accepted()) >= 10, "deliveries under way")
    postgres_proxy.cut("reset")
    await signals_queue.publish(*events[20:40])
    await first.wait_logged("worker could not apply event; retrying")
    first.kill()
    postgres_proxy.restore()
    transmitters.append(await Transmitter.start(proxied))
    await signals_queue.publish(*events[40:])

    await wait_until(
        lambda: {e.event_id for e in events} <= set(receiver.accepted()),
        "every event delivered after the cut",
        within=60,
    )
    ids = receiver.accepted()
    report_counts(
        events=len(events),
        delivered=len(set(ids)),
        lost=len({e.event_id for e in events} - set(ids)),
        redelivered=len(ids) - len(set(ids)),
    )


async def test_two_replicas_make_each_delivery_once(
    settings: Settings,
    receivers: StartReceiver,
    transmitters: list[Transmitter],
    signals_queue: Broker,
    report_counts: Callable[..., None],
) -> None:
    async def take_a_while(request: web.Request, attempt: int) -> web.StreamResponse:
        # A replica's batch then takes long enough for the other's poll to find work.
        await asyncio.sleep(0.1)
        return web.Response(status=200)

    receiver = await receivers(take_a_while)
    await register(settings, receiver)
    transmitters.append(await Transmitter.start(settings))
    transmitters.append(await Transmitter.start(settings))
    events = [make_event(n) for n in range(300)]
    await signals_queue.publish(*events)

    await wait_until(lambda: len(receiver.accepted()) >= 300, "every event delivered", within=30)
    await asyncio.sleep(2)  # a second copy of any would arrive by now
    ids = receiver.ids()
    report_counts(
        events=len(events),
        attempts=len(ids),
        duplicates=len(ids) - len(set(ids)),
        by_first_replica=len(transmitters[0].logged("signal delivered")),
        by_second_replica=len(transmitters[1].logged("signal delivered")),
    )
    assert sorted(ids) == sorted(e.event_id for e in events)
    # Both replicas took part.
    assert all(t.logged("signal delivered") for t in transmitters)


async def test_a_redirect_is_not_followed_and_fails_the_delivery(
    settings: Settings,
    receivers: StartReceiver,
    transmitters: list[Transmitter],
    signals_queue: Broker,
) -> None:
    async def elsewhere(request: web.Request, attempt: int) -> web.StreamResponse:
        return web.Response(status=307, headers={"Location": target.url})

    target = await receivers()
    redirecting = await receivers(elsewhere)
    redirecting_id = await register(settings, redirecting)
    target.secret = redirecting.secret  # it would verify, were it ever reached
    transmitters.append(await Transmitter.start(settings))
    await signals_queue.publish(make_event(1))

    async def failed() -> bool:
        rows = await deliveries(settings, redirecting_id)
        return [(row["state"], row["last_status"]) for row in rows] == [("failed", 307)]

    await wait_until(failed, "the redirected delivery marked failed")
    assert len(redirecting.received) == 1
    assert target.received == []
