"""The push-cleanup worker against the real RabbitMQ and Redis."""

from __future__ import annotations

from collections.abc import Callable

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from session_close.keys import Keys
from session_close.scripts import REMOVE_PUSH_TOKENS
from session_close.settings import Settings
from tests.conftest import through
from tests.support.proxy import TcpProxy
from tests.support.waiting import wait_until
from tests.support.workers import (
    Broker,
    in_process,
    make_event,
    retry_count,
    running,
    settled_count,
)
from workers.push_cleanup import open_push_cleanup


async def test_a_token_reregistered_by_a_newer_session_survives_a_late_or_repeated_event(
    settings: Settings, broker: Broker, redis: Redis, keys: Keys
) -> None:
    push = keys.user_push("u1")
    await redis.hset(
        push,
        mapping={
            "token-old-phone": "s-old",  # only ever the closed session's
            "token-tablet": "s-tablet",  # another device, another session
            "token-phone": "s-new",  # the same phone, re-registered after a new login
        },
    )
    closed = make_event(session_id="s-old", user_id="u1")
    worker = in_process(settings, "push-cleanup", open_push_cleanup)
    async with running(worker):
        await broker.publish(closed)

        async def acked(n: int) -> bool:
            return settled_count(worker.metrics, "acked") == n

        await wait_until(lambda: acked(1), "the event handled")
        assert await redis.hgetall(push) == {"token-tablet": "s-tablet", "token-phone": "s-new"}

        # The old phone logs in again and re-registers its token before the event for its
        # previous session is redelivered: the late repeat must not remove it.
        await redis.hset(push, "token-old-phone", "s-relogin")
        await broker.publish(closed)
        await wait_until(lambda: acked(2), "the repeated event handled")
    assert await redis.hgetall(push) == {
        "token-tablet": "s-tablet",
        "token-phone": "s-new",
        "token-old-phone": "s-relogin",
    }
    assert settled_count(worker.metrics, "dead_lettered") == 0


async def test_push_cleanup_retries_while_redis_is_cut_and_cleans_up_after_restore(
    settings: Settings, broker: Broker, redis: Redis, keys: Keys, redis_proxy: TcpProxy
) -> None:
    push = keys.user_push("u2")
    await redis.hset(push, mapping={"token-a": "s-closed", "token-b": "s-open"})
    worker = in_process(
        settings,
        "push-cleanup",
        open_push_cleanup,
        redis_url=through(settings.redis_url, redis_proxy),
        worker_max_attempts=2,  # fewer than the retries: an outage never counts
    )
    async with running(worker):
        redis_proxy.cut("reset")
        await broker.publish(make_event(session_id="s-closed", user_id="u2"))

        async def retrying() -> bool:
            return retry_count(worker.metrics) >= 3

        await wait_until(retrying, "retries against the cut Redis")
        assert await redis.hgetall(push) == {"token-a": "s-closed", "token-b": "s-open"}
        redis_proxy.restore()

        async def settled() -> bool:
            return settled_count(worker.metrics, "retried") == 1

        await wait_until(settled, "the event handled after restore")
    assert await redis.hgetall(push) == {"token-b": "s-open"}
    assert (await broker.depth(broker.topology.dead_letter_queue("push-cleanup")))[0] == 0


async def test_one_cleanup_failing_inside_redis_fails_alone_and_leaves_its_batch_done(
    redis: Redis, keys: Keys
) -> None:
    """One script run for three sessions; the second user's push key has the wrong type."""
    good_a, bad, good_c = keys.user_push("ua"), keys.user_push("ub"), keys.user_push("uc")
    await redis.hset(good_a, mapping={"token-a": "s-a", "token-a2": "s-other"})
    await redis.set(bad, "not a hash")
    await redis.hset(good_c, "token-c", "s-c")
    replies = await REMOVE_PUSH_TOKENS(redis, [good_a, bad, good_c], ["s-a", "s-b", "s-c"])
    assert replies[0] == replies[2] == 1
    assert isinstance(replies[1], ResponseError)
    assert "WRONGTYPE" in str(replies[1])
    assert await redis.hgetall(good_a) == {"token-a2": "s-other"}
    assert await redis.exists(good_c) == 0


async def test_tokens_reregistered_while_the_cleanup_runs_are_never_removed(
    settings: Settings,
    broker: Broker,
    redis: Redis,
    keys: Keys,
    report_counts: Callable[..., None],
) -> None:
    """The compare-and-delete must be one step in Redis. Many devices re-register their
    tokens (to a newer session) while the cleanup of the old session runs: a cleanup that
    read the hash and then deleted what it had read would remove the tokens re-registered
    between its two steps."""
    push = keys.user_push("u-race")
    tokens = [f"token-{n:05d}" for n in range(20_000)]
    for start in range(0, len(tokens), 5_000):
        await redis.hset(push, mapping={t: "s-old" for t in tokens[start : start + 5_000]})
    worker = in_process(settings, "push-cleanup", open_push_cleanup)
    created: list[int] = []
    async with running(worker):
        for start in range(0, len(tokens), 100):
            if start == len(tokens) // 4:
                await broker.publish(make_event(session_id="s-old", user_id="u-race"))
            pipe = redis.pipeline(transaction=False)
            for token in tokens[start : start + 100]:
                pipe.hset(push, token, "s-new")
            created += await pipe.execute()

        async def handled() -> bool:
            return settled_count(worker.metrics, "acked") == 1

        await wait_until(handled, "the cleanup handled")
    left = await redis.hgetall(push)
    before_cleanup, after_cleanup = created.count(0), created.count(1)
    report_counts(
        tokens=len(tokens),
        reregistered_before_cleanup=before_cleanup,
        reregistered_after_cleanup=after_cleanup,
        kept=len(left),
    )
    # The cleanup ran while the devices re-registered: some found their old entry, some
    # found it already removed and wrote it anew. Otherwise nothing raced.
    assert before_cleanup > 0
    assert after_cleanup > 0
    assert before_cleanup + after_cleanup == len(tokens)
    assert left == dict.fromkeys(tokens, "s-new")
