"""One way to build the Redis client, with every call bounded by REDIS_TIMEOUT_SECONDS,
to the Redis of REDIS_URL or to the primary that REDIS_SENTINELS name (followed through
a failover), and the check that the Redis it talks to keeps what it is given."""

from __future__ import annotations

import logging
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
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


class BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """The primary's address from Sentinel (asked again whenever a connection is made,
    so a failover is followed without a restart), in a pool that waits for a free
    connection like BlockingConnectionPool."""

    async def aclose(self) -> None:
        await super().aclose()
        # The client's aclose() ends here: the connections to the Sentinels go too.
        await self.sentinel_manager.aclose()


def connect_redis(settings: Settings) -> Redis:
    timeout = settings.redis_timeout_seconds
    # A WAIT for replicas blocks its connection up to REDIS_REPLICA_TIMEOUT_SECONDS
    # beyond the command itself; the caller's own bound still covers the whole step.
    read_timeout = timeout + (
        settings.redis_replica_timeout_seconds if settings.redis_min_replicas else 0
    )
    # A pool of a known size, where a caller waits (within the same bound) for a
    # connection instead of failing at once, or opening connections without end.
    options: dict[str, Any] = {
        "max_connections": settings.redis_max_connections,
        "timeout": timeout,
        "decode_responses": True,
        "socket_timeout": read_timeout,
        "socket_connect_timeout": timeout,
        # One quick retry on a dropped connection; a retried close is safe because the
        # script compares the event id with the tombstone's.
        "retry": Retry(NoBackoff(), 1),
        "health_check_interval": 30,
    }
    if not settings.redis_sentinels:
        return Redis.from_pool(BlockingConnectionPool.from_url(settings.redis_url, **options))
    # REDIS_URL's host is Sentinel's to say; its database, user and password still apply.
    from_url: dict[str, Any] = dict(parse_url(settings.redis_url))
    for key in ("host", "port", "path", "connection_class"):
        from_url.pop(key, None)
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        settings.sentinel_addresses,
        sentinel_kwargs={"socket_timeout": timeout, "socket_connect_timeout": timeout},
    )
    pool = BlockingSentinelPool(  # type: ignore[no-untyped-call]
        settings.redis_sentinel_master,
        sentinel,
        ssl=settings.redis_url.startswith("rediss:"),
        **from_url,
        **options,
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
