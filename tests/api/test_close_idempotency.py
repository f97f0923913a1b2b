"""Closing is atomic and idempotent (docs/http-api.md): of any number of concurrent or
repeated closes of one session exactly one succeeds and exactly one event exists."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from aiohttp.pytest_plugin import AiohttpClient
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from outbox.stream import backlog
from service.app import create_app
from service.appkeys import AMQP
from session_close.keys import Keys, bucket_of
from session_close.scripts import CLOSE_SESSIONS
from session_close.settings import Settings
from session_close.topology import Topology
from tests.support.closing import (
    BODY,
    CLOSE_PATH,
    Client,
    app_headers,
    open_session,
    queue_depth,
    snapshot,
)
from tests.support.processes import redis_server
from tests.support.waiting import wait_until

USER, SID, TOKEN = "user-1", "session-0001", "token-of-user-1"


async def outbox_appended(redis: Redis, keys: Keys) -> int:
    """How many entries were ever added to the outbox (the relay deletes published ones)."""
    info = await redis.xinfo_stream(keys.outbox(bucket_of(USER)))
    return int(info["entries-added"])


async def published(redis: Redis, keys: Keys, settings: Settings, expected: int) -> int:
    """Wait until the relay has published everything, then count the audit queue."""
    queue = Topology.from_settings(settings).queue("audit")

    async def drained() -> bool:
        return await backlog(redis, keys) == 0 and (
            await queue_depth(settings.amqp_url, queue) >= expected
        )

    await wait_until(drained, "the outbox to drain", within=10)
    return await queue_depth(settings.amqp_url, queue)


async def test_fifty_concurrent_closes_give_one_success_and_one_event(
    client: Client, redis: Redis, keys: Keys, settings: Settings
) -> None:
    await open_session(redis, keys, USER, SID, TOKEN)
    replies = await asyncio.gather(
        *(client.post(CLOSE_PATH, headers=app_headers(TOKEN, SID), data=BODY) for _ in range(50))
    )
    outcomes = Counter([(r.status, (await r.json())["info"]["type"]) for r in replies])
    assert outcomes == {(200, "success"): 1, (200, "info"): 49}
    assert await outbox_appended(redis, keys) == 1
    assert await published(redis, keys, settings, expected=1) == 1


async def test_a_repeat_after_success_is_case_8_and_adds_no_event(
    client: Client, redis: Redis, keys: Keys, settings: Settings
) -> None:
    await open_session(redis, keys, USER, SID, TOKEN)
    first = await client.post(CLOSE_PATH, headers=app_headers(TOKEN, SID), data=BODY)
    assert (await first.json())["info"]["type"] == "success"
    assert await published(redis, keys, settings, expected=1) == 1
    for _ in range(3):
        again = await client.post(CLOSE_PATH, headers=app_headers(TOKEN, SID), data=BODY)
        assert again.status == 200
        assert (await again.json())["info"]["type"] == "info"
    assert await outbox_appended(redis, keys) == 1
    assert await published(redis, keys, settings, expected=1) == 1


def script_call(keys: Keys, *closes: tuple[str, str]) -> tuple[list[str], list[object]]:
    """close_sessions.lua's call for a batch of (session id, event id) closes of USER."""
    bucket = bucket_of(USER)
    script_keys: list[str] = []
    args: list[object] = [600, "2026-01-01T00:00:00.000Z"]
    for sid, event_id in closes:
        script_keys += [
            keys.outbox(bucket),
            keys.expiry(bucket),
            keys.session(USER, sid),
            keys.tombstone(USER, sid),
            keys.user_sessions(USER),
        ]
        args += [USER, sid, event_id, "Android", "1.0.10", "r1", ""]
    return script_keys, args


async def test_a_retried_script_call_with_the_same_event_id_succeeds_without_a_second_event(
    redis: Redis, keys: Keys
) -> None:
    """What a client library's retry after a timeout does: the very same call again."""
    await open_session(redis, keys, USER, SID, TOKEN)
    call = script_call(keys, (SID, str(uuid.uuid4())))
    assert await CLOSE_SESSIONS(redis, *call) == ["closed"]
    assert await CLOSE_SESSIONS(redis, *call) == ["closed"]
    assert await backlog(redis, keys) == 1
    # A different request (a new event id) is a repeat: case 8.
    again = script_call(keys, (SID, str(uuid.uuid4())))
    assert await CLOSE_SESSIONS(redis, *again) == ["already"]
    assert await backlog(redis, keys) == 1


async def test_a_close_failing_inside_redis_fails_alone_and_leaves_its_batch_closed(
    redis: Redis, keys: Keys
) -> None:
    """One batch, three closes; the middle session's tombstone key has the wrong type."""
    sids = ["session-a", SID, "session-c"]
    for sid in sids:
        await open_session(redis, keys, USER, sid, TOKEN)
    await redis.set(keys.tombstone(USER, SID), "not a hash")
    replies = await CLOSE_SESSIONS(
        redis, *script_call(keys, *((s, str(uuid.uuid4())) for s in sids))
    )
    assert replies[0] == replies[2] == "closed"
    assert isinstance(replies[1], ResponseError)
    assert "WRONGTYPE" in str(replies[1])
    assert await backlog(redis, keys) == 2
    assert await redis.exists(keys.session(USER, SID)) == 1


async def test_closes_work_after_redis_lost_its_script_cache(
    settings: Settings,
    keys: Keys,
    amqp_cleanup: None,
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
) -> None:
    """As after a Redis restart: the closer loads the script again and the close runs once.
    On a redis-server of the test's own, since flushing the scripts of the shared one would
    touch every other user of it."""
    with redis_server(tmp_path) as url:
        own = dataclasses.replace(settings, redis_url=url, relay_enabled=False)
        client: Client = await aiohttp_client(create_app(own))
        redis = Redis.from_url(url, decode_responses=True)
        try:
            await open_session(redis, keys, USER, SID, TOKEN)
            resp = await client.post(CLOSE_PATH, headers=app_headers(TOKEN, SID), data=BODY)
            assert (await resp.json())["info"]["type"] == "success"
            await open_session(redis, keys, USER, "session-0002", TOKEN)
            await redis.script_flush()
            resp = await client.post(
                CLOSE_PATH, headers=app_headers(TOKEN, "session-0002"), data=BODY
            )
            assert (await resp.json())["info"]["type"] == "success"
            assert await outbox_appended(redis, keys) == 2
        finally:
            await client.close()
            await redis.aclose()


# Another user: in another bucket, and in USER's own bucket (layout 2 puts every key of a
# user in the bucket of CRC32(user id) mod 256), where only the scripts' ownership checks
# tell the sessions apart.
OTHER_USERS = ["user-2", "neighbour-177"]


def test_the_neighbour_shares_the_users_bucket() -> None:
    assert bucket_of("neighbour-177") == bucket_of(USER) != bucket_of("user-2")


@pytest.mark.parametrize("other", OTHER_USERS)
async def test_a_session_owned_by_another_user_is_404_and_left_alone(
    client: Client, redis: Redis, keys: Keys, other: str
) -> None:
    await open_session(redis, keys, USER, SID, TOKEN)
    await open_session(redis, keys, other, "session-0002", "token-of-user-2")
    before = await snapshot(redis, keys.prefix)
    resp = await client.post(CLOSE_PATH, headers=app_headers(TOKEN, "session-0002"), data=BODY)
    assert resp.status == 404
    assert (await resp.json())["info"]["type"] == "error"
    assert await snapshot(redis, keys.prefix) == before


@pytest.mark.parametrize("other", OTHER_USERS)
async def test_a_session_closed_by_another_user_is_404_not_case_8(
    client: Client, redis: Redis, keys: Keys, other: str
) -> None:
    await open_session(redis, keys, other, "session-0002", "token-of-user-2")
    await open_session(redis, keys, USER, SID, TOKEN)
    closed = await client.post(
        CLOSE_PATH, headers=app_headers("token-of-user-2", "session-0002"), data=BODY
    )
    assert (await closed.json())["info"]["type"] == "success"
    before = await snapshot(redis, keys.prefix)
    resp = await client.post(CLOSE_PATH, headers=app_headers(TOKEN, "session-0002"), data=BODY)
    assert resp.status == 404
    assert (await resp.json())["info"]["type"] == "error"
    assert await snapshot(redis, keys.prefix) == before


async def test_two_api_processes_closing_the_same_sessions_give_one_success_and_one_event_each(
    client: Client,
    redis: Redis,
    keys: Keys,
    settings: Settings,
    aiohttp_client: AiohttpClient,
    report_counts: Callable[..., None],
) -> None:
    """Two apps, each with its own Redis client, batcher and relay, as two API processes
    are: their closes of one session run in different script runs, not one batch."""
    other = await aiohttp_client(create_app(settings))
    await asyncio.wait_for(asyncio.shield(other.app[AMQP]), 10)
    sids = [f"session-{n:04d}" for n in range(20)]
    for sid in sids:
        await open_session(redis, keys, USER, sid, TOKEN)

    async def close(api: Client, sid: str) -> tuple[str, str]:
        resp = await api.post(CLOSE_PATH, headers=app_headers(TOKEN, sid), data=BODY)
        assert resp.status == 200
        return sid, (await resp.json())["info"]["type"]

    replies = await asyncio.gather(
        *(close(api, sid) for sid in sids for api in (client, other) for _ in range(5))
    )
    successes = Counter(sid for sid, kind in replies if kind == "success")
    events = await outbox_appended(redis, keys)
    delivered = await published(redis, keys, settings, expected=len(sids))
    report_counts(sent=len(replies), succeeded=sum(successes.values()), events=events)
    assert successes == dict.fromkeys(sids, 1)
    assert Counter(kind for _, kind in replies) == {"success": 20, "info": 180}
    assert events == len(sids)
    assert delivered == len(sids)


WRONG_TYPE_KEYS: dict[str, Callable[[Keys], str]] = {
    "token": lambda keys: keys.token(TOKEN),
    "session": lambda keys: keys.session(USER, SID),
    "user sessions": lambda keys: keys.user_sessions(USER),
    "tombstone": lambda keys: keys.tombstone(USER, SID),
    "outbox": lambda keys: keys.outbox(bucket_of(USER)),
}


@pytest.mark.parametrize("key", WRONG_TYPE_KEYS)
async def test_a_close_failing_on_a_key_of_the_wrong_type_writes_nothing_and_a_retry_closes(
    client: Client, redis: Redis, keys: Keys, settings: Settings, key: str
) -> None:
    await open_session(redis, keys, USER, SID, TOKEN)
    broken = WRONG_TYPE_KEYS[key](keys)
    original, ttl = await redis.dump(broken), max(await redis.pttl(broken), 0)
    await redis.delete(broken)
    await redis.set(broken, "a string where the close expects another type")
    before = await snapshot(redis, keys.prefix)

    resp = await client.post(CLOSE_PATH, headers=app_headers(TOKEN, SID), data=BODY)
    assert resp.status == 500
    assert (await resp.json())["info"]["type"] == "error"
    assert await snapshot(redis, keys.prefix) == before

    await redis.delete(broken)
    if original is not None:  # the tombstone did not exist before
        await redis.restore(broken, ttl, original)
    retry = await client.post(CLOSE_PATH, headers=app_headers(TOKEN, SID), data=BODY)
    assert retry.status == 200
    assert (await retry.json())["info"]["type"] == "success"
    assert await outbox_appended(redis, keys) == 1
    assert await published(redis, keys, settings, expected=1) == 1
