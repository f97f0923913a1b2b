"""One way to build the Redis client, with every call bounded by REDIS_TIMEOUT_SECONDS,
to the Redis of REDIS_URL or to the primary that REDIS_SENTINELS name (followed through
a failover); the one rule for "Redis is unavailable"; and the check that the Redis it
talks to keeps what it is given."""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Any, cast

import hiredis
from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis, RedisCluster
from redis.asyncio.connection import AbstractConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError
from redis.typing import EncodableT

from session_close.settings import Settings

log = logging.getLogger(__name__)

# The outbox and the tombstones live in Redis: an append-only file synced at least every
# second, and no eviction, or a restart or a full memory silently loses events.
DURABLE = {
    "appendonly": frozenset({"yes"}),
    "appendfsync": frozenset({"everysec", "always"}),
    "maxmemory-policy": frozenset({"noeviction"}),
}


# Redis cannot serve for now, and will again without anyone touching the data: worth a
# retry, never the request's or the event's fault. Closes answer 503, the workers retry
# without limit, the relay and the sweeper wait it out.
_UNAVAILABLE_TYPES: tuple[type[BaseException], ...] = (
    redis_errors.ConnectionError,  # refused, reset, too many clients; LOADING included
    redis_errors.TimeoutError,
    OSError,  # the built-in ConnectionError and TimeoutError (asyncio.timeout) included
    redis_errors.OutOfMemoryError,
    redis_errors.ReadOnlyError,
    redis_errors.TryAgainError,
    redis_errors.ClusterDownError,  # MASTERDOWN included
)
# The error replies that say so: cannot persist (MISCONF), full (OOM), a replica
# (READONLY), loading its data (LOADING), running a long script (BUSY), short of the
# replicas min-replicas-to-write asks for (NOREPLICAS), a cluster changing (TRYAGAIN,
# MASTERDOWN, CLUSTERDOWN). redis-py gives some of them a class of their own (above) and
# the others (MISCONF, BUSY, NOREPLICAS) as a ResponseError whose message starts with the
# code, also when a script's redis.call met it. A pipeline's error has redis-py's note in
# front of it. Only the first word counts: BUSYGROUP, or a key name in a WRONGTYPE
# message, is no outage.
UNAVAILABLE_REPLIES = (
    "MISCONF",
    "OOM",
    "READONLY",
    "LOADING",
    "BUSY",
    "NOREPLICAS",
    "TRYAGAIN",
    "MASTERDOWN",
    "CLUSTERDOWN",
)
_UNAVAILABLE_REPLY = re.compile(
    r"(?:Command # \d+ \(.*\) of pipeline caused error: \(')?"
    rf"(?:{'|'.join(UNAVAILABLE_REPLIES)})(?: |\Z)",
    re.DOTALL,
)


def unavailable(exc: BaseException) -> bool:
    """True when `exc` says Redis cannot serve for now (see UNAVAILABLE_REPLIES), rather
    than that the request or the data is wrong (WRONGTYPE, a script error)."""
    if isinstance(exc, _UNAVAILABLE_TYPES):
        return True
    return isinstance(exc, ResponseError) and _UNAVAILABLE_REPLY.match(str(exc)) is not None


class BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """The primary's address from Sentinel (asked again whenever a connection is made,
    so a failover is followed without a restart), in a pool that waits for a free
    connection like BlockingConnectionPool."""

    async def aclose(self) -> None:
        await super().aclose()
        # The client's aclose() ends here: the connections to the Sentinels go too.
        await self.sentinel_manager.aclose()


def connect_redis(settings: Settings, *, resend: bool = True, decode: bool = True) -> Redis:
    """The client, whose replies are text (`decode`) or, for a caller that moves data as it
    is (`sessionctl migrate-keys`), bytes. With `resend`, a command whose connection
    dropped is sent once more on a new one: only for callers whose every command is safe
    to run twice (a close script compares the event id with the tombstone's). The outbox
    relay's is not (`resend` False): it cannot know whether a command whose reply was
    lost ran, and a re-sent `XREADGROUP >` hands out more entries while the lost reply's
    sit unseen in its pending list; the relay re-reads those itself."""
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
        "decode_responses": decode,
        # Bytes that are not UTF-8 (an `os` some writer got wrong) read as U+FFFD: a
        # read of the outbox, or of anything else, never fails on what an entry holds.
        "encoding_errors": "replace",
        "socket_timeout": read_timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 1 if resend else 0),
        "health_check_interval": 30,
    }
    if settings.redis_cluster:
        return _cluster(settings, options)
    if not settings.redis_sentinels:
        return Redis.from_pool(
            _packed_by_hiredis(BlockingConnectionPool.from_url(settings.redis_url, **options))
        )
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
    return Redis.from_pool(_packed_by_hiredis(pool))


def _packed_by_hiredis(pool: ConnectionPool) -> ConnectionPool:
    """The pool, its connections encoding commands with hiredis's C encoder, as redis-py's
    synchronous client does when hiredis is installed. Its asyncio client encodes in
    Python, about 1.5 µs an argument: a batch of closes sends 13 a close, the relay's read
    of every bucket 521 (0.8 ms a read), where hiredis takes a tenth of a µs. The bytes are
    the same (tests/shared/test_redis_client.py); what hiredis does not take (a command
    name of two words, a value of an unexpected type) goes to redis-py's encoder."""
    base = pool.connection_class

    def pack_command(connection: AbstractConnection, *args: EncodableT) -> list[bytes]:
        if isinstance(args[0], str) and " " not in args[0]:
            with contextlib.suppress(TypeError):
                return [hiredis.pack_command(args)]  # type: ignore[arg-type]
        return base.pack_command(connection, *args)

    pool.connection_class = type(base.__name__, (base,), {"pack_command": pack_command})
    return pool


def _cluster(settings: Settings, options: dict[str, Any]) -> Redis:
    """A Redis Cluster client, starting from the node REDIS_URL names. It sends each
    command to the primary of its key's slot and follows MOVED and ASK. Typed as Redis:
    it takes the commands, pipelines and scripts this service sends alike (a script's
    keys must share a slot, which the key layout ensures)."""
    cluster = RedisCluster.from_url(
        settings.redis_url,
        # Per node, as the single-node pool: a caller waits for a free connection.
        max_connections=options["max_connections"],
        decode_responses=True,
        encoding_errors=options["encoding_errors"],
        socket_timeout=options["socket_timeout"],
        socket_connect_timeout=options["socket_connect_timeout"],
        retry=options["retry"],
        health_check_interval=options["health_check_interval"],
    )
    return cast(Redis, cluster)


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
