"""Bulk seeding of tokens and sessions in the login side's form (docs/redis.md).

Per session this writes what session_close.cli.create_session writes, but many sessions share
one pipeline round trip, so 100k sessions take seconds. The names match close.lua:
session i is "b<run>-<i>", owned by user "bu<i % users>" with token "bt-<run>-<i % users>".
"""

from __future__ import annotations

import time

from redis.asyncio import Redis

from session_close.keys import Keys

USERS = 1000
TTL_SECONDS = 3600
CHUNK = 2000


def session_id(run_id: str, i: int) -> str:
    return f"b{run_id}-{i}"


def user_id(i: int) -> str:
    return f"bu{i % USERS}"


def token(run_id: str, i: int) -> str:
    return f"bt-{run_id}-{i % USERS}"


def push_token(run_id: str, i: int) -> str:
    return f"push-{run_id}-{i}"


async def seed_tokens(redis: Redis, keys: Keys, run_id: str) -> None:
    pipe = redis.pipeline(transaction=False)
    for u in range(USERS):
        key = keys.token(token(run_id, u))
        pipe.hset(key, mapping={"user_id": user_id(u)})
        pipe.expire(key, TTL_SECONDS)
    await pipe.execute()


async def seed_sessions(
    redis: Redis, keys: Keys, run_id: str, first: int, count: int, *, push: bool = False
) -> None:
    """Sessions first..first+count-1, each with a push token registered when push."""
    created_at = int(time.time())
    for start in range(first, first + count, CHUNK):
        pipe = redis.pipeline(transaction=False)
        for i in range(start, min(start + CHUNK, first + count)):
            sid, uid = session_id(run_id, i), user_id(i)
            pipe.hset(
                keys.session(uid, sid),
                mapping={
                    "user_id": uid,
                    "created_at": created_at,
                    "os": "Android",
                    "app_version": "1.0.10",
                    "device_id": f"device-{i}",
                },
            )
            pipe.expire(keys.session(uid, sid), TTL_SECONDS)
            pipe.sadd(keys.user_sessions(uid), sid)
            if push:
                pipe.hset(keys.user_push(uid), push_token(run_id, i), sid)
        await pipe.execute()
