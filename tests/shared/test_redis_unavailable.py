"""session_close.redis_client.unavailable: the one rule for "Redis cannot serve for now",
over the error replies as redis-py makes them of what a real Redis sends (a script's
error reply goes through the same parser as the server's own)."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from session_close.keys import Keys
from session_close.redis_client import UNAVAILABLE_REPLIES, unavailable

REPLY = "return redis.error_reply(ARGV[1])"
IN_A_LIST = "return {redis.error_reply(ARGV[1])}"  # as the close and push scripts answer

NOT_AN_OUTAGE = [
    "WRONGTYPE user:OOM :push holds a string, not a hash",
    "BUSYGROUP Consumer Group name already exists",
    "BUSYKEY Target key name already exists.",
    "ERR Error running script MISCONF",
    "NOSCRIPT No matching script.",
]


async def error_of(redis: Redis, script: str, reply: str) -> RedisError:
    """What redis-py raises for the reply, or puts in the list for it (it raises a
    LOADING it finds first in a list)."""
    try:
        result = await redis.eval(script, 0, reply)
    except RedisError as exc:
        return exc
    [item] = result
    assert isinstance(item, ResponseError)
    return item


@pytest.mark.parametrize("script", [REPLY, IN_A_LIST], ids=["reply", "in-a-list"])
@pytest.mark.parametrize("code", UNAVAILABLE_REPLIES)
async def test_every_reply_that_says_redis_cannot_serve_for_now_is_unavailable(
    redis: Redis, script: str, code: str
) -> None:
    exc = await error_of(redis, script, f"{code} Redis says it cannot serve for now")
    assert unavailable(exc), repr(exc)


@pytest.mark.parametrize("reply", NOT_AN_OUTAGE)
async def test_an_error_of_the_request_or_the_data_is_not_unavailable(
    redis: Redis, reply: str
) -> None:
    exc = await error_of(redis, REPLY, reply)
    assert not unavailable(exc), repr(exc)


async def test_a_refused_write_in_a_transaction_is_unavailable_with_redis_pys_note(
    redis: Redis, keys: Keys
) -> None:
    """redis-py puts "Command # n (...) of pipeline caused error:" in front of it."""
    pipe = redis.pipeline(transaction=True)
    pipe.set(keys.write_check, "x")
    pipe.eval(REPLY, 0, "MISCONF cannot persist")
    with pytest.raises(ResponseError) as raised:
        await pipe.execute()
    assert "of pipeline caused error" in str(raised.value)
    assert unavailable(raised.value)


async def test_an_unreachable_redis_is_unavailable(redis: Redis) -> None:
    gone = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1)
    try:
        with pytest.raises(RedisError) as raised:
            await gone.ping()
        assert unavailable(raised.value)
    finally:
        await gone.aclose()
