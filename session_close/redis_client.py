"""One way to build the Redis client, with every call bounded by REDIS_TIMEOUT_SECONDS,
and the check that the Redis it talks to keeps what it is given."""

from __future__ import annotations

import logging

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from session_close.settings import Settings

log = logging.getLogger(__name__)

# The outbox and the tombstones live in Redis: an append-only file synced at least every
# second, and no eviction, or a restart or a full memory silently loses events.
DURABLE = {
    "appendonly": frozenset({"yes"}),
    "appendfsync": frozenset({"everysec", "always"}),
    "maxmemory-policy": frozenset({"noeviction"}),
}


def connect_redis(settings: Settings, *, resend: bool = True) -> Redis:
    """The client. With `resend`, a command whose connection dropped is sent once more on
    a new one: only for callers whose every command is safe to run twice (a close script
    compares the event id with the tombstone's). The outbox relay's is not (`resend`
    False): it cannot know whether a command whose reply was lost ran, and a re-sent
    `XREADGROUP >` hands out more entries while the lost reply's sit unseen in its
    pending list; the relay re-reads those itself."""
    timeout = settings.redis_timeout_seconds
    # A pool of a known size, where a caller waits (within the same bound) for a
    # connection instead of failing at once, or opening connections without end.
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_max_connections,
        timeout=timeout,
        decode_responses=True,
        # Bytes that are not UTF-8 (an `os` some writer got wrong) read as U+FFFD: a
        # read of the outbox, or of anything else, never fails on what an entry holds.
        encoding_errors="replace",
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 1 if resend else 0),
        health_check_interval=30,
    )
    return Redis.from_pool(pool)


async def undurable_settings(redis: Redis) -> dict[str, str]:
    """The durability settings Redis reports that would lose events (name -> value);
    empty when all are right, or when Redis does not let us read its CONFIG."""
    found: dict[str, str] = {}
    try:
        for name in DURABLE:
            found.update(await redis.config_get(name))  # type: ignore[arg-type]
    except ResponseError as exc:
        # A managed Redis often renames or forbids CONFIG: nothing to say then.
        log.debug("Redis CONFIG not readable", extra={"error": repr(exc)})
        return {}
    return {
        name: found.get(name, "") for name, good in DURABLE.items() if found.get(name) not in good
    }


async def warn_unless_durable(redis: Redis) -> None:
    try:
        wrong = await undurable_settings(redis)
    except (RedisError, OSError, TimeoutError):
        return  # unreachable at start: the caller already says so
    if wrong:
        log.warning(
            "Redis may lose outbox events and tombstones",
            extra={"redis_config": wrong, "expected": {k: sorted(v) for k, v in DURABLE.items()}},
        )
