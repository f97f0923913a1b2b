"""POST /v1.0/session/close-all in bounded steps: each run of close_all_sessions.lua
closes at most CLOSE_ALL_BATCH_SIZE sessions (atomically with their events), so a user
with 50,000 sessions does not hold Redis, and other users' closes go on meanwhile; the
reply counts every step; a retry with the same X-Request-ID finishes the job and answers
the total."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.pytest_plugin import AiohttpClient
from redis.asyncio import Redis

from service.app import create_app
from service.appkeys import AMQP
from service.closer import CLOSE_ALL_NAMESPACE
from session_close.cli import create_token
from session_close.keys import Keys, bucket_of
from session_close.scripts import CLOSE_ALL_SESSIONS
from session_close.settings import Settings
from tests.support.closing import (
    BODY,
    CLOSE_PATH,
    Client,
    app_headers,
    info_of,
    open_session,
    outbox_entries,
)
from tests.support.waiting import wait_until

CLOSE_ALL_PATH = "/v1.0/session/close-all"
USER, TOKEN = "user-many", "token-of-user-many"
OTHER, OTHER_TOKEN = "user-other", "token-of-user-other"
MANY = 50_000
OTHER_CLOSES = 200


def close_all_headers(**extra: str) -> dict[str, str]:
    headers = app_headers(TOKEN, "", **extra)
    del headers["Sessionid"]
    return headers


def close_all_body(**content: Any) -> bytes:
    return json.dumps({"requestContent": content}).encode()


@pytest.fixture
async def unlinked(redis: Redis, keys: Keys) -> AsyncIterator[None]:
    """Deletes the test's keys in pipelined batches: the redis fixture's one-by-one delete
    of 100,000 keys would take longer than the test."""
    yield
    batch: list[str] = []
    async for key in redis.scan_iter(match=f"{keys.prefix}*", count=5000):
        batch.append(key)
        if len(batch) == 5000:
            await redis.unlink(*batch)
            batch = []
    if batch:
        await redis.unlink(*batch)


def app_with(settings: Settings, **changes: Any) -> Any:
    """The real app without its relay (the outbox entries stay to be counted)."""
    return create_app(dataclasses.replace(settings, relay_enabled=False, **changes))


async def write_sessions(redis: Redis, keys: Keys, user: str, sids: list[str]) -> None:
    """Sessions as the login side writes them, pipelined: 50,000 in a couple of seconds."""
    for start in range(0, len(sids), 5000):
        pipe = redis.pipeline(transaction=False)
        for sid in sids[start : start + 5000]:
            pipe.hset(keys.session(user, sid), mapping={"user_id": user, "os": "iOS"})
            pipe.sadd(keys.user_sessions(user), sid)
        await pipe.execute()


async def test_a_50000_session_close_all_leaves_other_users_closes_fast(
    settings: Settings,
    redis: Redis,
    keys: Keys,
    unlinked: None,
    amqp_cleanup: None,
    aiohttp_client: AiohttpClient,
    report_counts: Any,
) -> None:
    client: Client = await aiohttp_client(app_with(settings))
    # Connected and the topology declared: that work is not on the event loop meanwhile.
    await asyncio.wait_for(asyncio.shield(client.app[AMQP]), 10)
    await create_token(redis, keys, USER, TOKEN, 600)
    await write_sessions(redis, keys, USER, [f"many-{i:05d}" for i in range(MANY)])
    for sid in [*(f"other-{i:03d}" for i in range(OTHER_CLOSES)), "other-warm"]:
        await open_session(redis, keys, OTHER, sid, OTHER_TOKEN)
    # Warm-up, not measured: a close and a close-all at once leave two connections in the
    # app's Redis pool, as a running API has; else the first close during the close-all
    # would open one, a handshake of several round trips each behind a close-all step.
    await open_session(redis, keys, "user-warm", "warm-0001", "token-of-user-warm")
    warm_close, warm_close_all = await asyncio.gather(
        client.post(CLOSE_PATH, headers=app_headers(OTHER_TOKEN, "other-warm"), data=BODY),
        client.post(
            CLOSE_ALL_PATH,
            headers=close_all_headers(Authorization="Basic token-of-user-warm"),
            data=close_all_body(),
        ),
    )
    assert (warm_close.status, warm_close_all.status) == (200, 200)

    close_all = asyncio.create_task(
        client.post(CLOSE_ALL_PATH, headers=close_all_headers(), data=close_all_body())
    )
    # The other user's closes start once the close-all is under way and follow one
    # another, over its whole duration.
    await wait_until(lambda: _has_entries(redis, keys), "the close-all's first step", within=30)
    # Latencies of the closes answered while the close-all still ran.
    latencies, statuses = [], []
    for i in range(OTHER_CLOSES):
        started = time.perf_counter()
        resp = await client.post(
            CLOSE_PATH, headers=app_headers(OTHER_TOKEN, f"other-{i:03d}"), data=BODY
        )
        if not close_all.done():
            latencies.append(time.perf_counter() - started)
        statuses.append(resp.status)
    info = await info_of(await close_all, 200, "success")

    during = len(latencies)
    p99 = sorted(latencies)[math.ceil(0.99 * len(latencies)) - 1]
    report_counts(
        sessions=MANY, other_closes=OTHER_CLOSES, during_close_all=during, p99_ms=p99 * 1000
    )
    assert statuses == [200] * OTHER_CLOSES
    assert during >= 30, f"only {during} closes ran while the close-all did"
    assert p99 < 0.1, f"p99 {p99 * 1000:.0f} ms"
    assert info["closedSessions"] == MANY
    entries = await outbox_entries(redis, keys)
    mine = [f for f in entries if f["user_id"] == USER]
    assert len(mine) == MANY
    assert len({f["session_id"] for f in mine}) == MANY
    assert len({f["event_id"] for f in mine}) == MANY
    assert len(entries) == MANY + 1 + OTHER_CLOSES + 1
    assert await redis.scard(keys.user_sessions(USER)) == 0


def close_all_call(
    keys: Keys, run: str, request_id: str, batch: int
) -> tuple[list[str], list[object]]:
    """close_all_sessions.lua's KEYS and ARGV (but the cursor and the first-run flag) for
    a close-all of USER that keeps no session, as service/closer.py builds them."""
    bucket = bucket_of(USER)
    script_keys = [
        keys.outbox(bucket),
        keys.expiry(bucket),
        keys.user_sessions(USER),
        keys.close_all(USER, run),
        keys.session(USER, ""),
    ]
    args = [keys.tag(bucket), 600, "2026-01-01T00:00:00Z", USER, "", run, request_id, "", batch]
    return script_keys, args


async def _has_entries(redis: Redis, keys: Keys) -> bool:
    return bool(await redis.xlen(keys.outbox(bucket_of(USER))))


async def test_each_script_run_closes_at_most_the_batch_size(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    """The steps run by hand, as service/closer.py runs them: each run's own reply and the
    outbox's growth between runs both show at most 10 sessions."""
    await create_token(redis, keys, USER, TOKEN, 600)
    await write_sessions(redis, keys, USER, [f"few-{i:02d}" for i in range(35)])
    script_keys, args = close_all_call(keys, uuid.uuid4().hex, "req-steps", 10)
    cursor, first, runs, closed = "0", True, [], 0
    while True:
        before = await redis.xlen(keys.outbox(bucket_of(USER)))
        reply = await CLOSE_ALL_SESSIONS(redis, script_keys, [*args, cursor, "1" if first else "0"])
        assert reply[0] == "closed"
        n, total, cursor, done = reply[1:]
        runs.append((int(n), await redis.xlen(keys.outbox(bucket_of(USER))) - before))
        closed += int(n)
        assert int(total) == closed
        first = False
        if int(done):
            break
        assert len(runs) < 20, runs
    assert all(n <= 10 and added == n for n, added in runs), runs
    assert closed == 35
    assert await redis.xlen(keys.outbox(bucket_of(USER))) == 35
    assert await redis.scard(keys.user_sessions(USER)) == 0


async def test_close_all_answers_the_count_of_every_step(
    settings: Settings, redis: Redis, keys: Keys, amqp_cleanup: None, aiohttp_client: AiohttpClient
) -> None:
    client: Client = await aiohttp_client(app_with(settings, close_all_batch_size=10))
    await create_token(redis, keys, USER, TOKEN, 600)
    await write_sessions(redis, keys, USER, [f"few-{i:02d}" for i in range(35)])
    resp = await client.post(CLOSE_ALL_PATH, headers=close_all_headers(), data=close_all_body())
    info = await info_of(resp, 200, "success")
    assert info["closedSessions"] == 35
    assert await redis.xlen(keys.outbox(bucket_of(USER))) == 35


async def test_a_retry_with_the_same_request_id_finishes_and_counts_the_first_attempt(
    settings: Settings, redis: Redis, keys: Keys, amqp_cleanup: None, aiohttp_client: AiohttpClient
) -> None:
    """The first attempt got as far as one step (10 sessions) before its reply was lost;
    the retry, with the same X-Request-ID, closes the other 25 and answers 35."""
    client: Client = await aiohttp_client(app_with(settings, close_all_batch_size=10))
    await create_token(redis, keys, USER, TOKEN, 600)
    await write_sessions(redis, keys, USER, [f"few-{i:02d}" for i in range(35)])
    run = uuid.uuid5(CLOSE_ALL_NAMESPACE, "req-retried").hex
    script_keys, args = close_all_call(keys, run, "req-retried", 10)
    first = await CLOSE_ALL_SESSIONS(redis, script_keys, [*args, "0", "1"])
    assert first[:2] == ["closed", 10]

    headers = close_all_headers(**{"X-Request-ID": "req-retried"})
    info = await info_of(
        await client.post(CLOSE_ALL_PATH, headers=headers, data=close_all_body()), 200, "success"
    )
    assert info["closedSessions"] == 35
    assert await redis.xlen(keys.outbox(bucket_of(USER))) == 35
    # Once more, after it all was done: the same answer, and no event more.
    again = await info_of(
        await client.post(CLOSE_ALL_PATH, headers=headers, data=close_all_body()), 200, "success"
    )
    assert again["closedSessions"] == 35
    assert await redis.xlen(keys.outbox(bucket_of(USER))) == 35
    # Without the request id it is a new close-all: nothing left to close.
    other = await info_of(
        await client.post(CLOSE_ALL_PATH, headers=close_all_headers(), data=close_all_body()),
        200,
        "info",
    )
    assert other["closedSessions"] == 0


async def test_keep_current_is_checked_in_the_first_step_and_kept_in_every_step(
    settings: Settings, redis: Redis, keys: Keys, amqp_cleanup: None, aiohttp_client: AiohttpClient
) -> None:
    client: Client = await aiohttp_client(app_with(settings, close_all_batch_size=10))
    await open_session(redis, keys, USER, "few-kept", TOKEN)
    await write_sessions(redis, keys, USER, [f"few-{i:02d}" for i in range(35)])
    headers = app_headers(TOKEN, "few-kept")
    resp = await client.post(CLOSE_ALL_PATH, headers=headers, data=close_all_body(keepCurrent=True))
    info = await info_of(resp, 200, "success")
    assert info["closedSessions"] == 35
    assert await redis.smembers(keys.user_sessions(USER)) == {"few-kept"}

    missing = app_headers(TOKEN, "few-not-open")
    resp = await client.post(CLOSE_ALL_PATH, headers=missing, data=close_all_body(keepCurrent=True))
    await info_of(resp, 404, "error")
    assert await redis.xlen(keys.outbox(bucket_of(USER))) == 35
