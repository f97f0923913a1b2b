"""The expiry sweeper: a session whose expires_at has passed gets exactly one
session.expired outbox entry, however many sweepers race; a sliding expiry is re-scored;
a session gone or written the old way is dropped from the index; a backlog is worked off
in bounded batches; a session failing inside Redis is set aside without holding back the
others."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid

from redis.asyncio import Redis

from outbox.sweeper import EVENT_NAMESPACE, Sweeper, SweepResult
from session_close.cli import create_session
from session_close.keys import Keys, bucket_of
from session_close.settings import Settings
from tests.support.closing import outbox_entries
from tests.support.delivered import outbox_length, user_in_bucket
from tests.support.waiting import wait_until

USER = "user-7"
# A user whose sessions fail to sweep, in USER's bucket: one sweep run (and its batch)
# covers both users' sessions.
BAD_USER = user_in_bucket(bucket_of(USER), stem="user-bad")


async def write_session(
    redis: Redis, keys: Keys, sid: str, *, expires_in: float, user: str = USER
) -> None:
    """A session written the new way, its logical end `expires_in` seconds from now
    (negative: already past), its data kept an hour longer."""
    expires_at = time.time() + expires_in
    pipe = redis.pipeline(transaction=True)
    session = keys.session(user, sid)
    pipe.hset(session, mapping={"user_id": user, "expires_at": expires_at, "os": "iOS"})
    pipe.expire(session, 3600)
    pipe.zadd(keys.expiry(bucket_of(user)), {sid: expires_at})
    pipe.sadd(keys.user_sessions(user), sid)
    await pipe.execute()


def sweeper(redis: Redis, settings: Settings, *, sweep_batch_size: int = 500) -> Sweeper:
    return Sweeper(redis, dataclasses.replace(settings, sweep_batch_size=sweep_batch_size))


async def test_an_expired_session_gets_one_event_and_leaves_no_trace(
    redis: Redis, keys: Keys, settings: Settings
) -> None:
    await write_session(redis, keys, "sid-expired-1", expires_in=-5)
    expires_at = str(await redis.hget(keys.session(USER, "sid-expired-1"), "expires_at"))

    result = await sweeper(redis, settings).sweep_once()

    assert result == SweepResult(expired=1, rescored=0, dropped=0, failed=0, lag=0.0)
    [entry] = await outbox_entries(redis, keys)
    assert entry["type"] == "session.expired"
    assert entry["reason"] == "expired"
    assert (entry["session_id"], entry["user_id"], entry["os"]) == ("sid-expired-1", USER, "iOS")
    assert float(entry["expired_at"]) < time.time() - 4
    assert entry["request_id"] == ""
    # The script's version-5 UUID is Python's: stable for this session and moment.
    assert entry["event_id"] == str(uuid.uuid5(EVENT_NAMESPACE, f"sid-expired-1@{expires_at}"))
    assert not await redis.exists(keys.session(USER, "sid-expired-1"))
    assert not await redis.sismember(keys.user_sessions(USER), "sid-expired-1")
    assert await redis.zscore(keys.expiry(bucket_of(USER)), "sid-expired-1") is None
    # No tombstone: a close answers "not found" before and after the sweep alike.
    assert not await redis.exists(keys.tombstone(USER, "sid-expired-1"))


async def test_a_session_not_yet_expired_is_left_alone(
    redis: Redis, keys: Keys, settings: Settings
) -> None:
    await write_session(redis, keys, "sid-alive-01", expires_in=300)

    result = await sweeper(redis, settings).sweep_once()

    assert (result.expired, result.rescored, result.dropped) == (0, 0, 0)
    assert await redis.exists(keys.session(USER, "sid-alive-01"))
    assert await redis.zscore(keys.expiry(bucket_of(USER)), "sid-alive-01") is not None
    assert await outbox_entries(redis, keys) == []


async def test_a_sliding_expiry_is_rescored_not_expired(
    redis: Redis, keys: Keys, settings: Settings
) -> None:
    await write_session(redis, keys, "sid-slid-001", expires_in=-5)
    # The login side extended the session but its index entry still has the old score.
    later = time.time() + 600
    await redis.hset(keys.session(USER, "sid-slid-001"), "expires_at", later)

    result = await sweeper(redis, settings).sweep_once()

    assert (result.expired, result.rescored) == (0, 1)
    assert await redis.zscore(keys.expiry(bucket_of(USER)), "sid-slid-001") == later
    assert await redis.exists(keys.session(USER, "sid-slid-001"))
    assert await outbox_entries(redis, keys) == []


async def test_a_gone_or_old_style_session_is_dropped_from_the_index_without_event(
    redis: Redis, keys: Keys, settings: Settings
) -> None:
    await redis.zadd(keys.expiry(bucket_of(USER)), {"sid-gone-001": time.time() - 5})
    await create_session(redis, keys, USER, "sid-old-0001", ttl=600)  # no expires_at
    await redis.zadd(keys.expiry(bucket_of(USER)), {"sid-old-0001": time.time() - 5})

    result = await sweeper(redis, settings).sweep_once()

    assert (result.expired, result.dropped) == (0, 2)
    assert await redis.zcard(keys.expiry(bucket_of(USER))) == 0
    assert await redis.exists(keys.session(USER, "sid-old-0001"))
    assert await outbox_entries(redis, keys) == []


async def test_racing_sweepers_give_each_expired_session_exactly_one_event(
    redis: Redis, keys: Keys, settings: Settings
) -> None:
    sids = [f"sid-race-{i:04d}" for i in range(400)]
    for sid in sids:
        await write_session(redis, keys, sid, expires_in=-1)
    # Four sweepers with their own connections, small batches, all at once.
    clients = [Redis.from_url(settings.redis_url, decode_responses=True) for _ in range(4)]
    try:
        sweepers = [sweeper(client, settings, sweep_batch_size=25) for client in clients]

        async def drain(s: Sweeper) -> int:
            expired = 0
            while (result := await s.sweep_once()).expired:
                expired += result.expired
            return expired

        counts = await asyncio.gather(*(drain(s) for s in sweepers))
    finally:
        for client in clients:
            await client.aclose()

    entries = await outbox_entries(redis, keys)
    assert sum(counts) == len(sids)
    assert sorted(e["session_id"] for e in entries) == sids
    assert len({e["event_id"] for e in entries}) == len(sids)
    assert await redis.zcard(keys.expiry(bucket_of(USER))) == 0


async def test_a_backlog_is_worked_off_in_batches_of_at_most_the_batch_size(
    redis: Redis, keys: Keys, settings: Settings
) -> None:
    pipe = redis.pipeline(transaction=False)
    now = time.time()
    for i in range(1200):
        sid = f"sid-back-{i:05d}"
        pipe.hset(keys.session(USER, sid), mapping={"user_id": USER, "expires_at": now - 60})
        pipe.zadd(keys.expiry(bucket_of(USER)), {sid: now - 60})
    await pipe.execute()
    s = sweeper(redis, settings, sweep_batch_size=500)

    runs = []
    while (result := await s.sweep_once()).expired:
        runs.append(result)

    assert [r.expired for r in runs] == [500, 500, 200]
    # While a backlog is left, the run reports how far behind the sweeper is.
    assert runs[0].lag >= 59
    assert runs[-1].lag == 0
    assert await outbox_length(redis, keys) == 1200


async def test_a_session_failing_inside_redis_is_set_aside_and_writes_nothing(
    redis: Redis, keys: Keys, settings: Settings
) -> None:
    await write_session(redis, keys, "sid-bad-0001", expires_in=-5, user=BAD_USER)
    await redis.delete(keys.user_sessions(BAD_USER))
    await redis.set(keys.user_sessions(BAD_USER), "not a set")
    await write_session(redis, keys, "sid-good-001", expires_in=-5)

    result = await sweeper(redis, settings).sweep_once()

    assert (result.expired, result.failed) == (1, 1)
    [entry] = await outbox_entries(redis, keys)
    assert entry["session_id"] == "sid-good-001"
    assert await redis.exists(keys.session(BAD_USER, "sid-bad-0001"))
    # Set aside, not dropped: tried again later, after the sessions due now.
    score = await redis.zscore(keys.expiry(bucket_of(BAD_USER)), "sid-bad-0001")
    assert score is not None
    assert score > time.time() + 30


async def test_sessions_failing_inside_redis_never_hold_back_the_sessions_due_after_them(
    redis: Redis, keys: Keys, settings: Settings
) -> None:
    # Two bad sessions due first, four good ones due after them, three sessions a run:
    # the first run fails both bad ones and sweeps its good neighbour; the bad ones set
    # aside, the second run reaches the three good ones left.
    for n in range(2):
        await write_session(redis, keys, f"sid-bad-{n:04d}", expires_in=-10 + n, user=BAD_USER)
    await redis.delete(keys.user_sessions(BAD_USER))
    await redis.set(keys.user_sessions(BAD_USER), "not a set")
    good = [f"sid-good-{n:03d}" for n in range(4)]
    for n, sid in enumerate(good):
        await write_session(redis, keys, sid, expires_in=-5 + n / 10)
    sweep = sweeper(redis, settings, sweep_batch_size=3)

    first = await sweep.sweep_once()
    second = await sweep.sweep_once()

    assert (first.expired, first.failed) == (1, 2)
    assert (second.expired, second.failed) == (3, 0)
    assert sorted(e["session_id"] for e in await outbox_entries(redis, keys)) == good


async def test_the_sweeper_loop_sweeps_sessions_as_they_expire(
    redis: Redis, keys: Keys, settings: Settings
) -> None:
    seen: list[SweepResult] = []
    s = Sweeper(
        redis, dataclasses.replace(settings, sweep_interval_seconds=0.2), on_sweep=seen.append
    )
    task = asyncio.create_task(s.run())
    try:
        await write_session(redis, keys, "sid-loop-001", expires_in=0.5)

        # The test may read the entry before the sweeper has handled its own reply (two
        # connections), so wait for both: the entry, and the sweep that reports it.
        async def swept() -> bool:
            return await outbox_length(redis, keys) == 1 and any(r.expired for r in seen)

        await wait_until(swept, "the session's session.expired entry, reported", within=10)
        assert sum(r.expired for r in seen) == 1
        assert await outbox_length(redis, keys) == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
