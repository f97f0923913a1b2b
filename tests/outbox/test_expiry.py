"""session.expired end to end: a session past its expires_at answers 404 to a close
before and after the sweep, its event reaches both workers (audit row with reason
expired, push tokens removed), and closes racing the sweeper give exactly one event per
session, either session.closed or session.expired."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter

from aiohttp.pytest_plugin import AiohttpClient
from redis.asyncio import Redis

from outbox.sweeper import Sweeper
from service.app import create_app
from session_close.cli import create_session, create_token
from session_close.events import SessionEvent, _schema
from session_close.keys import Keys, bucket_of
from session_close.settings import Settings
from tests.support.closing import (
    BODY,
    CLOSE_PATH,
    Client,
    app_headers,
    outbox_entries,
    snapshot,
)
from tests.support.waiting import wait_until
from tests.support.workers import (
    AuditTable,
    in_process,
    running,
    settled_count,
)
from workers.audit import open_audit
from workers.push_cleanup import open_push_cleanup

USER, TOKEN = "user-exp", "token-of-user-exp"


async def expiring_session(
    redis: Redis, keys: Keys, sid: str, expires_in: float, **fields: str
) -> float:
    """A session written the new way (sessionctl's create_session), then given the logical
    end `expires_in` seconds from now; returns that end."""
    await create_session(redis, keys, USER, sid, ttl=600, expiry_grace=3600, **fields)
    expires_at = time.time() + expires_in
    await redis.hset(keys.session(USER, sid), "expires_at", expires_at)
    await redis.zadd(keys.expiry(bucket_of(USER)), {sid: expires_at})
    return expires_at


def test_the_sweepers_entry_makes_a_valid_session_expired_cloudevent() -> None:
    event = SessionEvent.from_outbox(
        {
            "type": "session.expired",
            "reason": "expired",
            "event_id": "6f0b2a1c-0d4e-5b7a-8c9d-0e1f2a3b4c5d",
            "session_id": "session-1",
            "user_id": "user-1",
            "closed_at": "2026-11-28T10:00:01.250Z",
            "expired_at": "1795860000.5",
            "os": "iOS",
            "app_version": "",
            "request_id": "",
        }
    )
    cloudevent = event.to_cloudevent("/eliab/session-service")
    assert _schema.validate(cloudevent) == {}
    assert cloudevent["type"] == "session.expired"
    assert cloudevent["data"]["reason"] == "expired"
    assert cloudevent["data"]["expiredAt"] == "2026-11-28T10:00:00.500Z"
    assert cloudevent["data"]["closedAt"] == "2026-11-28T10:00:01.250Z"
    assert cloudevent["data"]["requestId"] is None
    assert SessionEvent.decode(event.encode("/s")) == event


async def test_an_expired_session_reaches_both_workers_as_session_expired(
    settings: Settings,
    redis: Redis,
    keys: Keys,
    amqp_cleanup: None,
    aiohttp_client: AiohttpClient,
    audit_table: AuditTable,
) -> None:
    sweeping = dataclasses.replace(settings, sweep_interval_seconds=0.2)
    await aiohttp_client(create_app(sweeping))
    await expiring_session(redis, keys, "session-exp-1", 0.5, os="Android", push_token="push-1")
    await create_session(redis, keys, USER, "session-live", ttl=600, push_token="push-2")
    audit = in_process(settings, "audit", open_audit)
    push = in_process(settings, "push-cleanup", open_push_cleanup)
    async with running(audit), running(push):

        async def both_done() -> bool:
            return (
                settled_count(audit.metrics, "acked") == 1
                and settled_count(push.metrics, "acked") == 1
            )

        await wait_until(both_done, "both workers to handle the session.expired event")
    [event_id] = await audit_table.event_ids()
    row = await audit_table.row(event_id)
    assert (row["session_id"], row["user_id"], row["reason"]) == ("session-exp-1", USER, "expired")
    assert (row["os"], row["request_id"]) == ("Android", None)
    assert await redis.hgetall(keys.user_push(USER)) == {"push-2": "session-live"}
    assert await redis.smembers(keys.user_sessions(USER)) == {"session-live"}


async def test_a_close_of_a_session_past_its_expires_at_is_404_before_and_after_the_sweep(
    settings: Settings,
    redis: Redis,
    keys: Keys,
    amqp_cleanup: None,
    aiohttp_client: AiohttpClient,
) -> None:
    quiet = dataclasses.replace(settings, relay_enabled=False, sweeper_enabled=False)
    client: Client = await aiohttp_client(create_app(quiet))
    await create_token(redis, keys, USER, TOKEN, 600)
    await expiring_session(redis, keys, "session-exp-2", -1)

    before = await snapshot(redis, keys.prefix)
    resp = await client.post(CLOSE_PATH, headers=app_headers(TOKEN, "session-exp-2"), data=BODY)
    assert resp.status == 404
    assert await snapshot(redis, keys.prefix) == before

    assert (await Sweeper(redis, quiet).sweep_once()).expired == 1
    resp = await client.post(CLOSE_PATH, headers=app_headers(TOKEN, "session-exp-2"), data=BODY)
    assert resp.status == 404
    assert not await redis.exists(keys.tombstone(USER, "session-exp-2"))
    assert [e["type"] for e in await outbox_entries(redis, keys)] == ["session.expired"]


async def test_closes_racing_the_sweeper_give_exactly_one_event_per_session(
    settings: Settings,
    redis: Redis,
    keys: Keys,
    amqp_cleanup: None,
    aiohttp_client: AiohttpClient,
) -> None:
    """Sessions expire while their closes arrive: each gets a session.closed (its close
    came first) or a session.expired (the sweeper, or its end, came first), never both
    and never neither; every successful close has its session.closed."""
    quiet = dataclasses.replace(settings, relay_enabled=False, sweeper_enabled=False)
    client: Client = await aiohttp_client(create_app(quiet))
    await create_token(redis, keys, USER, TOKEN, 600)
    sids = [f"session-race-{i:03d}" for i in range(150)]
    for i, sid in enumerate(sids):
        await expiring_session(redis, keys, sid, 0.3 + (i % 30) / 100)
    sweeper_redis = Redis.from_url(settings.redis_url, decode_responses=True)
    sweeper = Sweeper(sweeper_redis, dataclasses.replace(quiet, sweep_batch_size=7))
    try:

        async def close_racing_a_sweep(batch: list[str]) -> list[int]:
            """The batch's closes and a sweep, sent at once: their scripts interleave."""
            replies, _ = await asyncio.gather(
                asyncio.gather(
                    *(
                        client.post(CLOSE_PATH, headers=app_headers(TOKEN, sid), data=BODY)
                        for sid in batch
                    )
                ),
                sweeper.sweep_once(),
            )
            return [r.status for r in replies]

        batches = [sids[i : i + 10] for i in range(0, len(sids), 10)]
        statuses: list[int] = []
        for batch in batches[:5]:  # right away: most are closed before they expire
            statuses += await close_racing_a_sweep(batch)

        async def one_swept() -> bool:
            return (await sweeper.sweep_once()).expired > 0

        await wait_until(one_swept, "the sweeper's first session.expired", within=10)
        for batch in batches[5:]:  # the rest expire (0.3 to 0.6 s) as their closes arrive
            statuses += await close_racing_a_sweep(batch)

        async def all_swept() -> bool:  # whatever expired unclosed after the last close
            await sweeper.sweep_once()
            return await redis.zcard(keys.expiry(bucket_of(USER))) == 0

        await wait_until(all_swept, "every session left unclosed swept", within=10)
    finally:
        await sweeper_redis.aclose()

    entries = await outbox_entries(redis, keys)
    assert Counter(e["session_id"] for e in entries) == dict.fromkeys(sids, 1)
    kinds = Counter(e["type"] for e in entries)
    assert kinds["session.closed"] == statuses.count(200)
    assert kinds["session.expired"] == statuses.count(404)
    # The race was real: both outcomes happened.
    assert kinds["session.closed"] > 0
    assert kinds["session.expired"] > 0
    assert await redis.zcard(keys.expiry(bucket_of(USER))) == 0
