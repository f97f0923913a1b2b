"""The push-cleanup worker: removes from the user's push hash ({b<n>}:user:<uid>:push)
every push token still mapped to the closed session.

The compare-and-delete runs in Redis (session_close/lua/remove_push_tokens.lua), so a token that a
newer session on the same device re-registered, mapping it to the new session id, is
kept even when this event arrives late or twice. One session's failure inside the script
(a key of the wrong type) comes back as its own error, for the runner to retry and then
dead-letter; a whole run failing for its content is split one session per run.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from redis.asyncio import Redis

from session_close.batching import split_on_content_failure
from session_close.events import SessionEvent
from session_close.keys import Keys, bucket_of
from session_close.logs import log_each, short_id
from session_close.redis_client import connect_redis, unavailable
from session_close.scripts import REMOVE_PUSH_TOKENS, run_each
from session_close.settings import Settings
from workers.effect import Effect, event_ids

log = logging.getLogger(__name__)


class PushCleanup:
    def __init__(self, redis: Redis, keys: Keys, *, cluster: bool = False) -> None:
        self._redis = redis
        self._keys = keys
        # A script run may declare keys of several slots only off a cluster: there one
        # run serves a whole batch, on a cluster one bucket.
        self._cluster = cluster
        # Each batch the runner hands over is one script run.
        self._remove_or_split = split_on_content_failure(self._remove, self.transient)

    def transient(self, exc: BaseException) -> bool:
        # Redis unreachable or unable to write for now (MISCONF, OOM, READONLY...): retried
        # for as long as it takes. Any other error reply (WRONGTYPE) is the event's own.
        return unavailable(exc)

    async def apply(self, events: list[SessionEvent]) -> list[BaseException | None]:
        results = await self._remove_or_split(events)
        # Per event at DEBUG; at INFO, a line per script run (_remove).
        if log.isEnabledFor(logging.DEBUG):
            log_each(
                log,
                logging.DEBUG,
                "push tokens of a closed session removed",
                [
                    {
                        **event_ids(event),
                        "session_id": short_id(event.session_id),
                        "user_id": event.user_id,
                        "removed": removed if isinstance(removed, int) else repr(removed),
                    }
                    for event, removed in zip(events, results, strict=True)
                ],
            )
        return [r if isinstance(r, BaseException) else None for r in results]

    async def _remove(self, events: list[SessionEvent]) -> Sequence[int | BaseException]:
        runs: dict[int, list[int]] = {}
        for i, event in enumerate(events):
            runs.setdefault(bucket_of(event.user_id) if self._cluster else 0, []).append(i)
        calls = [
            (
                REMOVE_PUSH_TOKENS,
                [self._keys.user_push(events[i].user_id) for i in members],
                [events[i].session_id for i in members],
            )
            for members in runs.values()
        ]
        if len(calls) == 1:
            replies = [await REMOVE_PUSH_TOKENS(self._redis, *calls[0][1:])]
        else:
            replies = await run_each(self._redis, calls)
        results: list[int | BaseException] = [0] * len(events)
        for members, reply in zip(runs.values(), replies, strict=True):
            if isinstance(reply, BaseException):
                raise reply  # the whole run: split_on_content_failure tries each alone
            for i, removed in zip(members, reply, strict=True):
                # A session whose cleanup failed inside Redis comes back as its own error.
                results[i] = removed if isinstance(removed, BaseException) else int(removed)
        log.info(
            "push tokens of closed sessions removed",
            extra={
                "sessions": len(events),
                "removed": sum(r for r in results if isinstance(r, int)),
                "failed": sum(1 for r in results if isinstance(r, BaseException)),
            },
        )
        return results


@asynccontextmanager
async def open_push_cleanup(settings: Settings) -> AsyncIterator[Effect]:
    # No start-up check: a Redis that is down is retried per message like any outage.
    redis = connect_redis(settings)
    try:
        yield PushCleanup(redis, Keys(settings.redis_key_prefix), cluster=settings.redis_cluster)
    finally:
        await redis.aclose()
