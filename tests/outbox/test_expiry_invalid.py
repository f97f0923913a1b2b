"""An expires_at that is not a sane Unix time (lib.lua's expires_at_of: plain decimal,
finite, after 1970 and before the year 10000) is treated by every script as not given:
the sweeper never expires such a session and never writes an entry with a bad
expiredAt, drops its index entry and counts it as invalid (SweepResult, the
sweeper_sessions metric, a warning line); a close and a close-all close it as an open
session."""

from __future__ import annotations

import logging
import time

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from outbox.metrics import OutboxMetrics
from outbox.sweeper import Sweeper
from service.closer import CloseAllRequest, CloseOutcome, CloseRequest, SessionCloser
from session_close.cli import create_token
from session_close.keys import Keys, bucket_of
from session_close.settings import Settings
from tests.support.closing import outbox_entries

USER, TOKEN = "user-bad-expiry", "token-of-user-bad-expiry"

# What Lua's tonumber reads as a number that is no sane Unix time, then what it cannot
# read at all.
INVALID = ["nan", "0x10", "-1e20", "-62135596801", "inf", "-inf", "1e400", "abc", ""]


async def write_session(redis: Redis, keys: Keys, sid: str, expires_at: str) -> None:
    """A session whose hash says `expires_at`, indexed as due five seconds ago."""
    pipe = redis.pipeline(transaction=True)
    pipe.hset(keys.session(USER, sid), mapping={"user_id": USER, "expires_at": expires_at})
    pipe.expire(keys.session(USER, sid), 3600)
    pipe.zadd(keys.expiry(bucket_of(USER)), {sid: time.time() - 5})
    pipe.sadd(keys.user_sessions(USER), sid)
    await pipe.execute()


@pytest.mark.parametrize("expires_at", INVALID)
async def test_the_sweeper_counts_an_invalid_expires_at_and_never_expires_the_session(
    redis: Redis,
    keys: Keys,
    settings: Settings,
    expires_at: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await write_session(redis, keys, "sid-bad-0001", expires_at)
    registry = CollectorRegistry()
    metrics = OutboxMetrics(registry)
    sweeper = Sweeper(redis, settings, on_sweep=metrics.sweep)

    with caplog.at_level(logging.WARNING, logger="outbox.sweeper"):
        result = await sweeper.sweep_once()
        again = await sweeper.sweep_once()

    assert (result.expired, result.dropped, result.invalid) == (0, 0, 1)
    assert (again.expired, again.invalid) == (0, 0)
    swept = "sweeper_sessions_total"
    assert registry.get_sample_value(swept, {"outcome": "invalid"}) == 1
    assert registry.get_sample_value(swept, {"outcome": "expired"}) == 0
    warned = [r for r in caplog.records if "invalid expires_at" in r.getMessage()]
    assert [r.__dict__["invalid"] for r in warned] == [1]
    # Dropped from the index like a session written the old way; the session itself,
    # and its place in the user's set, stay.
    assert await redis.zscore(keys.expiry(bucket_of(USER)), "sid-bad-0001") is None
    assert await redis.exists(keys.session(USER, "sid-bad-0001"))
    assert await redis.sismember(keys.user_sessions(USER), "sid-bad-0001")
    assert await outbox_entries(redis, keys) == []


@pytest.mark.parametrize("expires_at", INVALID)
async def test_a_close_and_a_close_all_treat_an_invalid_expires_at_as_not_given(
    redis: Redis, keys: Keys, settings: Settings, expires_at: str
) -> None:
    await create_token(redis, keys, USER, TOKEN, 600)
    await write_session(redis, keys, "sid-bad-0001", expires_at)
    await write_session(redis, keys, "sid-bad-0002", expires_at)
    closer = SessionCloser(redis, settings)

    one = await closer.close(CloseRequest.new(TOKEN, "sid-bad-0001", "iOS", "1.0.0", "req-1"))
    every = await closer.close_all(CloseAllRequest(TOKEN, None, "req-2", None))

    assert one is CloseOutcome.CLOSED
    assert (every.outcome, every.closed) == (CloseOutcome.CLOSED, 1)
    entries = await outbox_entries(redis, keys)
    assert sorted((e["type"], e["session_id"]) for e in entries) == [
        ("session.closed", "sid-bad-0001"),
        ("session.closed", "sid-bad-0002"),
    ]
    assert all("expired_at" not in e for e in entries)
