"""A session is never swept before its expires_at: due in 0.5 s by Redis's clock, it is
still open, in its user's set and in the expiry index at 0.3 s, while a sweeper runs
every 0.05 s; its session.expired entry is written after its expires_at (the entry's
stream id is Redis's clock at the write)."""

from __future__ import annotations

import asyncio
import dataclasses
import math

from redis.asyncio import Redis

from outbox.sweeper import Sweeper
from session_close.keys import Keys, bucket_of
from session_close.settings import Settings
from tests.support.closing import outbox_entries
from tests.support.waiting import wait_until

USER, SID = "user-timing", "sid-timing-01"


async def redis_now(redis: Redis) -> float:
    seconds, microseconds = await redis.time()
    return seconds + microseconds / 1_000_000


async def test_a_session_is_swept_after_its_expires_at_never_before(
    redis: Redis, keys: Keys, settings: Settings
) -> None:
    expires_at = await redis_now(redis) + 0.5
    checked_from = expires_at - 0.2
    pipe = redis.pipeline(transaction=True)
    session, outbox = keys.session(USER, SID), keys.outbox(bucket_of(USER))
    pipe.hset(session, mapping={"user_id": USER, "expires_at": f"{expires_at:.6f}"})
    pipe.expire(session, 3600)
    pipe.zadd(keys.expiry(bucket_of(USER)), {SID: expires_at})
    pipe.sadd(keys.user_sessions(USER), SID)
    await pipe.execute()
    sweeper = Sweeper(redis, dataclasses.replace(settings, sweep_interval_seconds=0.05))
    task = asyncio.create_task(sweeper.run())
    try:
        # Seen open by a look that began 0.3 s in (by Redis's clock) and ended before
        # expires_at; any look that ended before expires_at must see it open.
        async def seen_open_at_0_3_s() -> bool:
            began = await redis_now(redis)
            state = (
                await redis.exists(session),
                await redis.sismember(keys.user_sessions(USER), SID),
                await redis.zscore(keys.expiry(bucket_of(USER)), SID) is not None,
                await redis.xlen(outbox),
            )
            ended = await redis_now(redis)
            if ended < expires_at:
                assert state == (1, 1, True, 0), f"swept {expires_at - ended:.3f} s early"
            return checked_from <= began and ended < expires_at

        await wait_until(seen_open_at_0_3_s, "a look at the session 0.3 s in", within=0.5)

        async def swept() -> bool:
            return await redis.xlen(outbox) == 1

        await wait_until(swept, "the session.expired entry", within=10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    entry_id: str = (await redis.xinfo_stream(outbox))["last-generated-id"]
    assert int(entry_id.split("-")[0]) >= math.floor(expires_at * 1000)
    [fields] = await outbox_entries(redis, keys)
    assert fields["type"] == "session.expired"
    assert float(fields["expired_at"]) == float(f"{expires_at:.6f}")
    assert not await redis.exists(session)
