"""session_close/replication.py on a redis-server of the test's own (no replica): the
script and its WAIT in one round trip, the script reloaded after Redis lost it, and a
step no replica confirmed, or run on a node that is a replica itself, raised as
NotReplicatedError."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from session_close.events import rfc3339_now
from session_close.keys import Keys, bucket_of
from session_close.redis_client import unavailable
from session_close.replication import NotReplicatedError, hold_replicated, run_replicated
from session_close.scripts import CLOSE_SESSIONS
from session_close.settings import Settings
from tests.support.processes import free_port, redis_server


def script_call(keys: Keys) -> tuple[list[str], list[object]]:
    """One close of a session nobody opened: the script answers "missing" and writes
    nothing."""
    bucket, user, sid = bucket_of("nobody"), "nobody", "session-0001"
    script_keys = [
        keys.outbox(bucket),
        keys.expiry(bucket),
        keys.session(user, sid),
        keys.tombstone(user, sid),
        keys.user_sessions(user),
    ]
    request = [user, sid, str(uuid.uuid4()), "", "", "req", ""]
    return script_keys, [60, rfc3339_now(), *request]


async def test_the_script_runs_again_after_redis_lost_its_script_cache(
    settings: Settings, keys: Keys, tmp_path: Path
) -> None:
    # WAIT 0 asks for no replica: the round trip runs as with REDIS_MIN_REPLICAS > 0.
    with redis_server(tmp_path) as url:
        redis = Redis.from_url(url, decode_responses=True)
        try:
            await redis.script_flush()
            reply = await run_replicated(CLOSE_SESSIONS, redis, *script_call(keys), settings)
            assert reply == ["missing"]
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
                await run_replicated(CLOSE_SESSIONS, redis, *script_call(keys), one)
            with pytest.raises(NotReplicatedError):
                await hold_replicated(redis, one, keys.relay_heartbeat("relay-1"))
        finally:
            await redis.aclose()


async def test_a_step_run_on_a_demoted_primary_is_not_replicated(
    settings: Settings, keys: Keys, tmp_path: Path
) -> None:
    """Two failovers in a row (the first promoted replica seen down at once) can leave a
    connection on a node that is a replica again. A script that writes nothing still runs
    there, and its WAIT is refused ("WAIT cannot be used with replica instances"): an
    unknown outcome like too few replicas (503), never a 500."""
    one = dataclasses.replace(settings, redis_min_replicas=1)
    # A replica of a primary that is not there: a replica all the same.
    with redis_server(tmp_path, "--replicaof", "127.0.0.1", str(free_port())) as url:
        redis = Redis.from_url(url, decode_responses=True)
        try:
            with pytest.raises(RedisError) as raised:
                await run_replicated(CLOSE_SESSIONS, redis, *script_call(keys), one)
            # Redis unavailable (503), the outcome unknown; not an error reply (500).
            assert isinstance(raised.value, NotReplicatedError), repr(raised.value)
            assert unavailable(raised.value)
        finally:
            await redis.aclose()
