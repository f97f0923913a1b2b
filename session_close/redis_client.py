"""One way to build the Redis client, with every call bounded by REDIS_TIMEOUT_SECONDS."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from session_close.settings import Settings


def connect_redis(settings: Settings) -> Redis:
    timeout = settings.redis_timeout_seconds
    return Redis.from_url(
        settings.redis_url,
        decode_responses=True,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        # One quick retry on a dropped connection; a retried close is safe because the
        # script compares the event id with the tombstone's.
        retry=Retry(NoBackoff(), 1),
        health_check_interval=30,
    )
