"""Reads of the outbox streams themselves (one per bucket), for the relay that drains
them and for the API that reports them (`/readyz`, `/metrics`). Each reads every bucket
in one pipeline: one round trip to each Redis node."""

from __future__ import annotations

from redis.asyncio import Redis

from session_close.keys import OUTBOX_GROUP, Keys


async def ensure_group(redis: Redis, keys: Keys) -> None:
    """The relays' group on every bucket's outbox, created with its stream if missing."""
    pipe = redis.pipeline(transaction=False)
    for outbox in keys.outboxes:
        pipe.xgroup_create(outbox, OUTBOX_GROUP, id="0", mkstream=True)
    for result in await pipe.execute(raise_on_error=False):
        if isinstance(result, Exception) and "BUSYGROUP" not in str(result):
            raise result


async def backlog(redis: Redis, keys: Keys) -> int:
    """Entries not yet confirmed by the broker (confirmed ones are deleted)."""
    pipe = redis.pipeline(transaction=False)
    for outbox in keys.outboxes:
        pipe.xlen(outbox)
    return sum(int(length) for length in await pipe.execute())


async def oldest_entry_age(redis: Redis, keys: Keys) -> float:
    """Seconds since the oldest entry of any outbox was written, from its id (Redis's
    clock, in ms), 0 when every outbox is empty: the first entry of each in one pipeline,
    then one TIME (which a cluster's pipeline does not take: it has no key to route by)."""
    pipe = redis.pipeline(transaction=False)
    for outbox in keys.outboxes:
        pipe.xrange(outbox, count=1)
    firsts = await pipe.execute()
    seconds, micros = await redis.time()
    oldest_ms = min(
        (int(str(first[0][0]).split("-", 1)[0]) for first in firsts if first), default=None
    )
    if oldest_ms is None:
        return 0.0
    now = int(seconds) + int(micros) / 1e6
    return max(0.0, now - oldest_ms / 1000)
