"""The expiry sweeper: sessions whose logical end (`expires_at`, indexed by the login side
in the expiry sorted set) has passed get their `session.expired` event.

The index is sharded over the 256 buckets of the key layout (docs/redis.md). Every
SWEEP_INTERVAL_SECONDS it runs sweep_expired.lua on every bucket, in one pipeline (a
round trip to each Redis node); each run handles at most SWEEP_BATCH_SIZE due sessions
of its bucket, each atomically with its outbox entry. While a bucket's run finds a full
batch, that bucket is swept again at once (a backlog), after yielding to the event loop,
so that no single step holds Redis, or the API, for long. Any number of
sweepers may run: the script's atomicity gives each expired session exactly one event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from redis.asyncio import Redis

from session_close.events import rfc3339_now
from session_close.keys import BUCKETS, Keys
from session_close.redis_client import unavailable
from session_close.retry import Backoff, Policy, pause
from session_close.scripts import SWEEP_EXPIRED, run_each
from session_close.settings import Settings

log = logging.getLogger(__name__)

# Fixed, so that a session expiring at a given moment always gets the same event id.
EVENT_NAMESPACE = uuid.UUID("6c1f3a52-2b0e-4a8e-9d57-5e0f1b7c3d21")
# A session that fails inside the script (a key of the wrong type) is tried again after
# this long instead of at every sweep.
SET_ASIDE_SECONDS = 60
OUTAGE = Policy(first=0.5, cap=5.0)


@dataclass(frozen=True, slots=True)
class SweepResult:
    expired: int
    rescored: int
    dropped: int
    failed: int
    # Seconds past its expires_at of the oldest session still due after the run.
    lag: float
    # Dropped from the index because their expires_at is not a valid Unix time.
    invalid: int = 0
    # The buckets whose run found a full batch: more may be due there.
    backlogged: tuple[int, ...] = ()


class Sweeper:
    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        *,
        on_sweep: Callable[[SweepResult], None] = lambda result: None,
    ) -> None:
        self._redis = redis
        self._keys = Keys(settings.redis_key_prefix)
        self._interval = settings.sweep_interval_seconds
        self._batch = settings.sweep_batch_size
        self._timeout = settings.redis_timeout_seconds
        self._on_sweep = on_sweep

    async def sweep_once(self, buckets: Sequence[int] = range(BUCKETS)) -> SweepResult:
        """One script run per bucket, each over at most SWEEP_BATCH_SIZE due sessions;
        the counts are their sums, the lag the largest."""
        args = [self._batch, rfc3339_now(), EVENT_NAMESPACE.hex, SET_ASIDE_SECONDS]
        calls = [
            (
                SWEEP_EXPIRED,
                [self._keys.expiry(b), self._keys.outbox(b)],
                [self._keys.tag(b), *args],
            )
            for b in buckets
        ]
        async with asyncio.timeout(self._timeout):
            replies = await run_each(self._redis, calls)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        counts = [[int(n) for n in (*reply[:4], reply[5])] for reply in replies]
        expired, rescored, dropped, failed, invalid = (
            sum(column) for column in zip(*counts, strict=False)
        )
        result = SweepResult(
            expired,
            rescored,
            dropped,
            failed,
            max(float(reply[4]) for reply in replies),
            invalid,
            tuple(
                b for b, handled in zip(buckets, counts, strict=True) if sum(handled) >= self._batch
            ),
        )
        if result.invalid:
            log.warning(
                "sessions with an invalid expires_at dropped from the expiry index",
                extra={"invalid": result.invalid},
            )
        if result.failed:
            log.warning(
                "sessions failed to sweep; set aside",
                extra={"failed": result.failed, "retry_in_seconds": SET_ASIDE_SECONDS},
            )
        self._on_sweep(result)
        return result

    async def run(self) -> None:
        """Sweep until cancelled; a Redis outage is waited out with backoff."""
        backoff = Backoff(OUTAGE)
        buckets: Sequence[int] = range(BUCKETS)
        while True:
            try:
                result = await self.sweep_once(buckets)
            except Exception as exc:
                if unavailable(exc):
                    # An outage (unreachable, or refusing writes: MISCONF...), waited out.
                    log.warning("expiry sweeper: Redis unavailable", extra={"error": repr(exc)})
                else:
                    log.exception("expiry sweeper failed; retrying")
                await backoff.sleep()
                continue
            backoff.reset()
            if result.backlogged:
                # A backlog: the next batch of those buckets at once, after other work.
                buckets = result.backlogged
                await pause(0)
                continue
            buckets = range(BUCKETS)
            await pause(self._interval)


async def stop(task: asyncio.Task[None]) -> None:
    """A sweep in flight is one atomic script run: cancelling it loses nothing."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
