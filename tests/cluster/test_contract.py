"""The contract on Redis Cluster (REDIS_CLUSTER=true), with the real processes on a
cluster of three primaries (tests/cluster/conftest.py): a close gives exactly one
session.closed event, a repeat none, a foreign session a 404 and no change; close-all
one event per session; an expired session exactly one session.expired; both workers act
on the events; sessions written by sessionctl close; and a user's keys land on the node
of the user's bucket, so that many users spread over all three primaries."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest
from redis.asyncio import Redis

from session_close.cli import create_session, create_token
from session_close.events import CLOSED, EXPIRED
from session_close.keys import Keys, bucket_of
from tests.cluster.conftest import Events, Stack
from tests.support.closing import BODY, CLOSE_PATH, app_headers
from tests.support.cluster import Cluster
from tests.support.processes import settings_env
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(90)

CLOSE_ALL_PATH = "/v1.0/session/close-all"
MANY_USERS = 200


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        yield session


def unique(name: str) -> str:
    """A name no other test of the module uses (they share the module's key prefix)."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


async def open_session(
    redis: Redis, keys: Keys, user: str, sid: str, token: str, **fields: Any
) -> None:
    await create_token(redis, keys, user, token, 600)
    await create_session(redis, keys, user, sid, ttl=600, **fields)


async def close(
    http: aiohttp.ClientSession, stack: Stack, token: str, sid: str
) -> tuple[int, dict[str, Any]]:
    """POST a close as the apps do: the status and the reply's info."""
    async with http.post(stack.url(CLOSE_PATH), headers=app_headers(token, sid), data=BODY) as resp:
        return resp.status, (await resp.json())["info"]


def buckets_of(keys: Keys, *users: str) -> list[str]:
    """What matches every key of the users' buckets: their keys, and the outbox and
    expiry index their closes would write (what other tests do there stays the same)."""
    return [f"{keys.tag(bucket_of(user))}*" for user in users]


async def test_a_close_gives_exactly_one_session_closed_event(
    stack: Stack, cluster: Cluster, redis: Redis, events: Events, http: aiohttp.ClientSession
) -> None:
    keys, user, sid, token = stack.keys, unique("user"), unique("session"), unique("token")
    await open_session(redis, keys, user, sid, token, os="iOS", app_version="1.0.0")
    status, info = await close(http, stack, token, sid)
    assert (status, info["type"]) == (200, "success"), info
    received = await events.settle(redis, keys, 1)
    assert [(e.type, e.session_id, e.user_id) for e in received] == [(CLOSED, sid, user)]
    # The session's keys and its tombstone sit on the node of the user's bucket.
    tombstone = keys.tombstone(user, sid)
    assert tombstone in cluster.keys_on(cluster.node_of(tombstone), tombstone)
    assert not await redis.exists(keys.session(user, sid))
    assert not await redis.sismember(keys.user_sessions(user), sid)


async def test_a_repeated_close_is_already_closed_with_no_second_event(
    stack: Stack, cluster: Cluster, redis: Redis, events: Events, http: aiohttp.ClientSession
) -> None:
    keys, user, sid, token = stack.keys, unique("user"), unique("session"), unique("token")
    await open_session(redis, keys, user, sid, token)
    assert (await close(http, stack, token, sid))[1]["type"] == "success"
    assert len(await events.settle(redis, keys, 1)) == 1
    before = cluster.snapshot(*buckets_of(keys, user))
    status, info = await close(http, stack, token, sid)
    assert (status, info["type"], info["title"]) == (200, "info", "Session already closed")
    assert cluster.snapshot(*buckets_of(keys, user)) == before
    received = await events.settle(redis, keys, 1)
    assert events.count(CLOSED) == Counter({sid: 1}), received


async def test_a_foreign_session_is_404_and_nothing_changes(
    stack: Stack, cluster: Cluster, redis: Redis, events: Events, http: aiohttp.ClientSession
) -> None:
    keys = stack.keys
    owner, other = unique("owner"), unique("other")
    sid, token, other_token = unique("session"), unique("token"), unique("token-other")
    await open_session(redis, keys, owner, sid, token)
    await open_session(redis, keys, other, unique("session"), other_token)
    before = cluster.snapshot(*buckets_of(keys, owner, other))
    # The other user's token, the owner's session: indistinguishable from an unknown one.
    status, info = await close(http, stack, other_token, sid)
    assert (status, info["type"]) == (404, "error"), info
    assert cluster.snapshot(*buckets_of(keys, owner, other)) == before
    assert await redis.sismember(keys.user_sessions(owner), sid)
    assert await events.settle(redis, keys, 0) == []


async def test_close_all_gives_one_event_per_session_of_the_user(
    stack: Stack, redis: Redis, events: Events, http: aiohttp.ClientSession
) -> None:
    keys, user, token = stack.keys, unique("user"), unique("token")
    sids = [unique(f"session-{n}") for n in range(5)]
    for sid in sids:
        await open_session(redis, keys, user, sid, token)
    bystander, untouched = unique("bystander"), unique("session-untouched")
    await open_session(redis, keys, bystander, untouched, unique("token"))
    headers = app_headers(token, "")
    del headers["Sessionid"]
    body = json.dumps({"requestContent": {}}).encode()
    async with http.post(stack.url(CLOSE_ALL_PATH), headers=headers, data=body) as resp:
        assert resp.status == 200, await resp.text()
        info = (await resp.json())["info"]
    assert (info["type"], info["closedSessions"]) == ("success", len(sids)), info
    received = await events.settle(redis, keys, len(sids))
    assert events.count(CLOSED) == Counter(dict.fromkeys(sids, 1)), received
    assert {e.reason for e in received} == {"user_logout_all"}
    assert await redis.scard(keys.user_sessions(user)) == 0
    assert await redis.sismember(keys.user_sessions(bystander), untouched)


async def test_sessions_of_many_users_spread_over_every_primary_and_each_close_gives_one_event(
    stack: Stack, cluster: Cluster, redis: Redis, events: Events, http: aiohttp.ClientSession
) -> None:
    keys, run = stack.keys, uuid.uuid4().hex[:6]
    users = [f"many-{run}-{n:03d}" for n in range(MANY_USERS)]
    sessions = {user: f"{user}-session" for user in users}
    for user in users:
        await open_session(redis, keys, user, sessions[user], f"{user}-token")
    by_node = cluster.keys_by_node(f"{keys.prefix}*:session:many-{run}-*")
    assert sum(len(found) for found in by_node.values()) == MANY_USERS
    assert all(by_node.values()), {port: len(found) for port, found in by_node.items()}
    for port, found in by_node.items():
        assert {cluster.node_of(key) for key in found} == {port}

    limit = asyncio.Semaphore(32)

    async def close_one(user: str) -> str:
        async with limit:
            status, info = await close(http, stack, f"{user}-token", sessions[user])
            return f"{status} {info['type']}"

    replies = await asyncio.gather(*(close_one(user) for user in users))
    assert Counter(replies) == Counter({"200 success": MANY_USERS})
    received = await events.settle(redis, keys, MANY_USERS, within=60)
    assert events.count(CLOSED) == Counter(dict.fromkeys(sessions.values(), 1))
    assert len(received) == MANY_USERS
    # Each close wrote its entry into the outbox of its user's bucket, on that bucket's
    # node: every primary's outboxes took some.
    buckets = {bucket_of(user) for user in users}
    written = {
        cluster.node_of(keys.outbox(b))
        for b in buckets
        if (await redis.xinfo_stream(keys.outbox(b)))["entries-added"]
    }
    assert written == set(cluster.ports)


async def test_an_expired_session_gets_exactly_one_session_expired_event(
    stack: Stack, cluster: Cluster, redis: Redis, events: Events
) -> None:
    keys = stack.keys
    # Users whose buckets' indexes sit on every node.
    users = cluster.users_on_every_node(keys, "expiring", 12)
    sessions = {user: f"{user}-session" for user in users}
    for user in users:
        await create_session(redis, keys, user, sessions[user], ttl=1, expiry_grace=60)
    nodes = {cluster.node_of(keys.expiry(bucket_of(user))) for user in users}
    assert nodes == set(cluster.ports)

    async def swept() -> bool:
        pipe = redis.pipeline(transaction=False)
        for user in users:
            pipe.zscore(keys.expiry(bucket_of(user)), sessions[user])
        return all(score is None for score in await pipe.execute())

    await wait_until(swept, "the sweeper to sweep every expired session", within=20)
    received = await events.settle(redis, keys, len(users))
    assert events.count(EXPIRED) == Counter(dict.fromkeys(sessions.values(), 1)), received
    assert len(received) == len(users)


async def test_both_workers_act_on_the_events_of_closes_on_the_cluster(
    stack: Stack, cluster: Cluster, redis: Redis, events: Events, http: aiohttp.ClientSession
) -> None:
    """The audit worker writes one row per event; the push-cleanup worker removes the
    closed sessions' push tokens from their users' push hashes, on every node."""
    keys = stack.keys
    users = cluster.users_on_every_node(keys, "worked", 12)
    sessions = {user: f"{user}-session" for user in users}
    for user in users:
        await open_session(
            redis, keys, user, sessions[user], f"{user}-token", push_token=f"{user}-push"
        )
        # A token the user's newer session re-registered stays.
        await redis.hset(keys.user_push(user), f"{user}-kept", "a-newer-session")
    assert {cluster.node_of(keys.user_push(user)) for user in users} == set(cluster.ports)
    for user in users:
        assert (await close(http, stack, f"{user}-token", sessions[user]))[1]["type"] == "success"
    received = await events.settle(redis, keys, len(users))
    assert events.count(CLOSED) == Counter(dict.fromkeys(sessions.values(), 1))

    async def pushes_removed() -> bool:
        pipe = redis.pipeline(transaction=False)
        for user in users:
            pipe.hgetall(keys.user_push(user))
        found = await pipe.execute()
        return found == [{f"{user}-kept": "a-newer-session"} for user in users]

    await wait_until(pushes_removed, "the push-cleanup worker to remove the tokens", within=20)
    conn = await asyncpg.connect(stack.settings.database_url)
    try:
        table = stack.settings.audit_table

        async def audited() -> list[asyncpg.Record]:
            return list(
                await conn.fetch(
                    f'SELECT event_id, session_id, user_id, reason FROM "{table}"'
                    " WHERE session_id = ANY($1::text[])",
                    list(sessions.values()),
                )
            )

        async def all_audited() -> bool:
            return len(await audited()) >= len(users)

        await wait_until(all_audited, "the audit worker to write a row per event", within=20)
        rows = await audited()
    finally:
        await conn.close()
    assert sorted((str(r["event_id"]), r["session_id"], r["user_id"]) for r in rows) == sorted(
        (e.event_id, e.session_id, e.user_id) for e in received
    )
    assert {r["reason"] for r in rows} == {"user_logout"}


async def test_sessions_written_by_sessionctl_close_with_one_event_each(
    stack: Stack, cluster: Cluster, redis: Redis, events: Events, http: aiohttp.ClientSession
) -> None:
    """`sessionctl session`, a process with a client of its own whose first command is
    the session's MULTI, on every node: the one REDIS_URL names (where the client starts
    out) included."""
    keys = stack.keys
    users = cluster.users_on_every_node(keys, "ctl", len(cluster.ports))
    sessions = {user: (user, f"{user}-session") for user in users}
    env = settings_env(stack.settings)
    for user, sid in sessions.values():
        ctl = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "session_close.cli", "session"),
            *("--user", user, "--session", sid),
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(ctl.communicate(), 30)
        assert ctl.returncode == 0, err.decode()[-2000:]
        assert json.loads(out) == {"userId": user, "sessionId": sid}
        await create_token(redis, keys, user, f"{user}-token", 600)
    for user, sid in sessions.values():
        assert (await close(http, stack, f"{user}-token", sid))[1]["type"] == "success"
    received = await events.settle(redis, keys, len(sessions))
    assert events.count(CLOSED) == Counter({sid: 1 for _, sid in sessions.values()})
    assert len(received) == len(cluster.ports)


async def test_every_process_serves_its_metrics_and_the_api_is_ready_on_the_cluster(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    """A scrape reads the outbox of every bucket on every node, and Redis's clock;
    /readyz reads them too, and writes."""
    async with http.get(stack.url("/readyz")) as resp:
        assert resp.status == 200, await resp.text()
    urls = [stack.url("/metrics")] + [
        f"http://127.0.0.1:{port}/metrics" for port in stack.metrics_ports.values()
    ]
    for url in urls:
        async with http.get(url) as resp:
            text = await resp.text()
            assert resp.status == 200, text
        assert "outbox_oldest_entry_age_seconds " in text, url
