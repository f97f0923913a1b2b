"""Durability before the reply (REDIS_MIN_REPLICAS): a step counts as done only once
Redis `WAIT`, on the connection that ran it, says that enough replicas hold it, so the
step survives the loss of its primary. With REDIS_MIN_REPLICAS=0 none of this runs."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from session_close.scripts import LuaScript
from session_close.settings import Settings


class NotReplicatedError(RedisTimeoutError):
    """Fewer replicas than REDIS_MIN_REPLICAS confirmed a step in time: it may be lost
    with its primary, so its outcome is unknown (503, like any Redis timeout)."""


def _wait_args(settings: Settings) -> tuple[str, int, int]:
    return (
        "WAIT",
        settings.redis_min_replicas,
        max(1, int(settings.redis_replica_timeout_seconds * 1000)),
    )


# WAIT's refusal on a replica. A connection can be left on a node a failover demoted (two
# failovers in a row: the first promoted replica seen down at once); a script that writes
# nothing still runs there, the WAIT after it does not. What that node answered is no
# more known to be held than a step too few replicas confirmed.
_WAIT_ON_A_REPLICA = "WAIT cannot be used with replica instances"


async def _confirmed(redis: Redis, acked: Any, settings: Settings) -> None:
    """Return when WAIT's reply `acked` says enough replicas hold the step, else raise
    NotReplicatedError. The node may then be a primary no more (a failover moved on, or
    demoted it), so the pool's idle connections, this one's included, are dropped: the
    next step asks Sentinel again rather than returning to that node."""
    if isinstance(acked, ResponseError) and str(acked).startswith(_WAIT_ON_A_REPLICA):
        why = f"the node is a replica now: {acked}"
    elif isinstance(acked, BaseException):
        raise acked
    elif int(acked) < settings.redis_min_replicas:
        why = f"{acked} of {settings.redis_min_replicas} replicas confirmed the write"
    else:
        return
    await redis.connection_pool.disconnect(inuse_connections=False)
    raise NotReplicatedError(why)


async def run_replicated(
    script: LuaScript, redis: Redis, keys: list[str], args: list[Any], settings: Settings
) -> Any:
    """The script's reply, once the replicas hold what it wrote: the script and the WAIT
    go in one round trip on one connection (a pipeline without MULTI)."""
    for attempt in range(2):
        async with redis.pipeline(transaction=False) as pipe:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
            pipe.execute_command(*_wait_args(settings))
            reply, acked = await pipe.execute(raise_on_error=False)
        if isinstance(reply, NoScriptError) and attempt == 0:
            # Redis restarted, or a failover promoted a replica that never loaded it.
            await script.load(redis)
            continue
        if isinstance(reply, BaseException):
            raise reply
        await _confirmed(redis, acked, settings)
        return reply
    raise AssertionError("unreachable: the second attempt returns or raises")


async def hold_replicated(redis: Redis, settings: Settings, heartbeat: str) -> None:
    """For the relay: return once the replicas hold everything this primary had written
    before the call (so the entries it just read). WAIT counts the writes of its own
    connection, so it follows, on the same connection, a refresh of the relay's
    heartbeat key (a write the relay makes anyway)."""
    if not settings.redis_min_replicas:
        return
    ttl_ms = int(settings.relay_heartbeat_seconds * 1000)
    async with redis.pipeline(transaction=False) as pipe:
        # PEXPIRE, as the relay beats: a full Redis still takes it.
        pipe.pexpire(heartbeat, ttl_ms)
        pipe.execute_command(*_wait_args(settings))
        refreshed, acked = await pipe.execute()
    if not refreshed:  # the key was gone: nothing written, so nothing for WAIT to count
        async with redis.pipeline(transaction=False) as pipe:
            pipe.set(heartbeat, "1", px=ttl_ms)
            pipe.execute_command(*_wait_args(settings))
            _, acked = await pipe.execute()
    await _confirmed(redis, acked, settings)
