"""The push-cleanup worker against a Redis that answers but refuses writes because it
cannot persist (MISCONF): an outage, retried for as long as it lasts, never a reason to
dead-letter a good event. On a redis-server of the test's own."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from redis.asyncio import Redis

from session_close.keys import Keys
from session_close.settings import Settings
from tests.support.processes import redis_server
from tests.support.redis_states import WRITABLE_DIR, cannot_persist, persists_again
from tests.support.waiting import wait_until
from tests.support.workers import (
    Broker,
    dead_letter_count,
    in_process,
    make_event,
    retry_count,
    running,
    settled_count,
)
from workers.push_cleanup import open_push_cleanup

MAX_ATTEMPTS = 2  # far fewer than the retries the outage causes


async def test_push_cleanup_retries_while_redis_cannot_persist_and_dead_letters_nothing(
    settings: Settings,
    broker: Broker,
    keys: Keys,
    tmp_path: Path,
    report_counts: Callable[..., None],
) -> None:
    users = [f"user-misconf-{n}" for n in range(10)]
    with redis_server(tmp_path, *WRITABLE_DIR) as url:
        redis = Redis.from_url(url, decode_responses=True)
        try:
            for user in users:
                await redis.hset(
                    keys.user_push(user), mapping={f"tok-{user}": f"s-{user}", "kept": "s-x"}
                )
            await cannot_persist(redis, tmp_path)
            worker = in_process(
                settings,
                "push-cleanup",
                open_push_cleanup,
                redis_url=url,
                worker_max_attempts=MAX_ATTEMPTS,
            )
            async with running(worker):
                await broker.publish(
                    *(make_event(n, session_id=f"s-{u}", user_id=u) for n, u in enumerate(users))
                )

                async def retried_past_the_limit() -> bool:
                    return retry_count(worker.metrics) >= len(users) * (MAX_ATTEMPTS + 2)

                await wait_until(retried_past_the_limit, "retries while Redis cannot persist")
                for user in users:
                    assert await redis.hlen(keys.user_push(user)) == 2
                await persists_again(redis, tmp_path)

                async def settled() -> bool:
                    return settled_count(worker.metrics, "retried") == len(users)

                await wait_until(settled, "every event handled once Redis persists again")
            for user in users:
                assert await redis.hgetall(keys.user_push(user)) == {"kept": "s-x"}
            dead = (await broker.depth(broker.topology.dead_letter_queue("push-cleanup")))[0]
            assert (dead, dead_letter_count(worker.metrics, "poison")) == (0, 0)
            report_counts(
                events=len(users), retries=retry_count(worker.metrics), dead_lettered=dead
            )
        finally:
            await redis.aclose()
