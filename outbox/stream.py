"""Reads of the outbox stream itself, for the relay that drains it and for the API that
reports it (`/readyz`, `/metrics`)."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from session_close.keys import OUTBOX_GROUP, Keys


async def ensure_group(redis: Redis, keys: Keys) -> None:
    try:
        await redis.xgroup_create(keys.outbox, OUTBOX_GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def backlog(redis: Redis, keys: Keys) -> int:
    """Entries not yet confirmed by the broker (confirmed ones are deleted)."""
    return int(await redis.xlen(keys.outbox))


async def oldest_entry_age(redis: Redis, keys: Keys) -> float:
    """Seconds since the outbox's first entry was written, from its id (Redis's clock, in
    ms), 0 when the outbox is empty: one XRANGE of one entry and one TIME, in one round
    trip."""
    pipe = redis.pipeline(transaction=False)
    pipe.xrange(keys.outbox, count=1)
    pipe.time()
    first, (seconds, micros) = await pipe.execute()
    if not first:
        return 0.0
    entry_ms = int(str(first[0][0]).split("-", 1)[0])
    now = int(seconds) + int(micros) / 1e6
    return max(0.0, now - entry_ms / 1000)
