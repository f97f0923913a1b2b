"""connect_redis behind Sentinel: REDIS_URL keeps its database, user and password (its
host is Sentinel's to say), the pool keeps its bounds, and what a failover raises is a
503, never a 500."""

from __future__ import annotations

import dataclasses

from redis.asyncio.sentinel import MasterNotFoundError, SentinelManagedConnection
from redis.exceptions import ReadOnlyError

from session_close.redis_client import BlockingSentinelPool, connect_redis, unavailable
from session_close.replication import NotReplicatedError
from session_close.settings import Settings


async def test_sentinel_client_keeps_the_urls_credentials_and_database_and_its_bounds() -> None:
    settings = dataclasses.replace(
        Settings(),
        redis_url="redis://someone:secret@ignored.example:1/3",
        redis_sentinels="127.0.0.1:26379,127.0.0.1:26380",
        redis_sentinel_master="mymaster",
        redis_max_connections=7,
        redis_timeout_seconds=0.75,
    )
    client = connect_redis(settings)
    try:
        pool = client.connection_pool
        assert isinstance(pool, BlockingSentinelPool)
        assert pool.service_name == "mymaster"
        assert issubclass(pool.connection_class, SentinelManagedConnection)
        kwargs = pool.connection_kwargs
        assert (kwargs["db"], kwargs["username"], kwargs["password"]) == (3, "someone", "secret")
        assert "host" not in kwargs
        assert pool.max_connections == 7
        assert pool.timeout == 0.75
        assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 0.75
        sentinels = [
            (
                s.connection_pool.connection_kwargs["host"],
                s.connection_pool.connection_kwargs["port"],
            )
            for s in pool.sentinel_manager.sentinels
        ]
        assert sentinels == [("127.0.0.1", 26379), ("127.0.0.1", 26380)]
    finally:
        await client.aclose()


async def test_with_min_replicas_a_read_may_wait_for_the_replicas_too() -> None:
    settings = dataclasses.replace(
        Settings(),
        redis_min_replicas=1,
        redis_timeout_seconds=1.0,
        redis_replica_timeout_seconds=0.5,
    )
    client = connect_redis(settings)
    try:
        assert client.connection_pool.connection_kwargs["socket_timeout"] == 1.5
    finally:
        await client.aclose()


def test_what_a_failover_raises_answers_503() -> None:
    for error in (MasterNotFoundError, ReadOnlyError, NotReplicatedError):
        assert unavailable(error("gone")), error
