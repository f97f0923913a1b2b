"""session_close/replication.py on a redis-server of the test's own (no replica): the
script and its WAIT in one round trip, the script reloaded after Redis lost it, and a
step no replica confirmed raised as NotReplicatedError."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import pytest
from redis.asyncio import Redis

from session_close.events import rfc3339_now
from session_close.keys import Keys, token_digest
from session_close.replication import NotReplicatedError, hold_replicated, run_replicated
from session_close.scripts import CLOSE_SESSIONS
from session_close.settings import Settings
from tests.support.processes import redis_server


def script_args(keys: Keys) -> list[object]:
    """One close by a token nobody holds: the script answers "token" and writes nothing."""
    request = [token_digest("no-such-token"), "session-0001", str(uuid.uuid4()), "", "", "req", ""]
    return [keys.prefix, 60, rfc3339_now(), *request]


async def test_the_script_runs_again_after_redis_lost_its_script_cache(
    settings: Settings, keys: Keys, tmp_path: Path
) -> None:
    # WAIT 0 asks for no replica: the round trip runs as with REDIS_MIN_REPLICAS > 0.
    with redis_server(tmp_path) as url:
        redis = Redis.from_url(url, decode_responses=True)
        try:
            await redis.script_flush()
            reply = await run_replicated(
                CLOSE_SESSIONS, redis, [keys.outbox, keys.expiry], script_args(keys), settings
            )
            assert reply == ["token"]
            assert await redis.script_exists(CLOSE_SESSIONS.sha) == [True]
        finally:
            await redis.aclose()


async def test_a_step_no_replica_confirmed_is_not_replicated(
    settings: Settings, keys: Keys, tmp_path: Path
) -> None:
    one = dataclasses.replace(settings, redis_min_replicas=1, redis_replica_timeout_seconds=0.05)
    with redis_server(tmp_path) as url:
        redis = Redis.from_url(url, decode_responses=True)
        try:
            with pytest.raises(NotReplicatedError):
                await run_replicated(
                    CLOSE_SESSIONS, redis, [keys.outbox, keys.expiry], script_args(keys), one
                )
            with pytest.raises(NotReplicatedError):
                await hold_replicated(redis, one, keys.relay_heartbeat("relay-1"))
        finally:
            await redis.aclose()
