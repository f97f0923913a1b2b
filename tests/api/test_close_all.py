"""POST /v1.0/session/close-all (log out everywhere): every open session of the token's
user is closed (in atomic steps: tests/api/test_close_all_bounded.py), each with its
tombstone and its own session.closed event (reason user_logout_all), except the
requesting session when it is kept; the same checks and error table as a single close;
racing single closes still give exactly one event per session."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections import Counter
from collections.abc import Awaitable
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.pytest_plugin import AiohttpClient
from redis.asyncio import Redis

from service.app import create_app
from service.schemas import InfoReplySchema
from session_close.cli import create_token
from session_close.keys import Keys, bucket_of
from session_close.settings import Settings
from tests.support.closing import (
    BODY,
    CLOSE_PATH,
    Client,
    app_headers,
    open_session,
    outbox_entries,
    snapshot,
)

CLOSE_ALL_PATH = "/v1.0/session/close-all"
USER, TOKEN = "user-all", "token-of-user-all"
SIDS = ["session-phone", "session-tablet", "session-laptop"]


def close_all_body(**content: Any) -> bytes:
    return json.dumps({"requestContent": content}).encode()


def close_all_headers(sid: str | None = None, **extra: str) -> dict[str, str]:
    headers = app_headers(TOKEN, sid or "", **extra)
    if sid is None:
        del headers["Sessionid"]
    return headers


async def info_of(resp: ClientResponse, status: int, info_type: str) -> dict[str, Any]:
    body = await resp.text()
    assert resp.status == status, body
    reply = json.loads(body)
    assert InfoReplySchema().validate(reply) == {}, reply
    info: dict[str, Any] = reply["info"]
    assert info["type"] == info_type, info
    return info


@pytest.fixture
async def client(
    settings: Settings, redis: Redis, amqp_cleanup: None, aiohttp_client: AiohttpClient
) -> Client:
    """The real app without its relay, so that the outbox entries stay to be read."""
    return await aiohttp_client(create_app(dataclasses.replace(settings, relay_enabled=False)))


@pytest.fixture
async def sessions(redis: Redis, keys: Keys) -> list[str]:
    """Three open sessions of the user on three devices, each with a push token."""
    for i, sid in enumerate(SIDS):
        await open_session(
            redis, keys, USER, sid, TOKEN, os=f"os-{i}", app_version=f"1.{i}.0", push_token=f"p{i}"
        )
    return SIDS


@dataclasses.dataclass
class Unchanged:
    redis: Redis
    keys: Keys
    before: dict[str, Any] = dataclasses.field(default_factory=dict)

    async def __aenter__(self) -> None:
        self.before = await snapshot(self.redis, self.keys.prefix)

    async def __aexit__(self, *exc: object) -> None:
        assert await snapshot(self.redis, self.keys.prefix) == self.before


async def test_every_open_session_is_closed_with_its_own_event(
    client: Client, redis: Redis, keys: Keys, sessions: list[str]
) -> None:
    resp = await client.post(
        CLOSE_ALL_PATH,
        headers=close_all_headers("session-phone", **{"X-Request-ID": "req-all-1"}),
        data=close_all_body(),
    )
    info = await info_of(resp, 200, "success")
    assert info == {
        "type": "success",
        "title": "Sessions closed!",
        "message": "Your sessions have been closed successfully!",
        "sessionId": "session-phone",
        "closedSessions": 3,
    }
    entries = await outbox_entries(redis, keys)
    assert sorted(e["session_id"] for e in entries) == sorted(sessions)
    for entry in entries:
        i = SIDS.index(entry["session_id"])
        assert entry["type"] == "session.closed"
        assert entry["reason"] == "user_logout_all"
        assert entry["request_id"] == "req-all-1"
        # The device that owned each session, not the requesting one's headers.
        assert (entry["os"], entry["app_version"]) == (f"os-{i}", f"1.{i}.0")
        assert uuid.UUID(entry["event_id"]).version == 5
        assert (
            await redis.hget(keys.tombstone(USER, entry["session_id"]), "event_id")
            == entry["event_id"]
        )
        assert not await redis.exists(keys.session(USER, entry["session_id"]))
    assert len({e["event_id"] for e in entries}) == 3
    assert await redis.scard(keys.user_sessions(USER)) == 0


async def test_keep_current_keeps_the_requesting_session(
    client: Client, redis: Redis, keys: Keys, sessions: list[str]
) -> None:
    resp = await client.post(
        CLOSE_ALL_PATH,
        headers=close_all_headers("session-phone"),
        data=close_all_body(keepCurrent=True),
    )
    info = await info_of(resp, 200, "success")
    assert info["closedSessions"] == 2
    assert sorted(e["session_id"] for e in await outbox_entries(redis, keys)) == [
        "session-laptop",
        "session-tablet",
    ]
    assert await redis.exists(keys.session(USER, "session-phone"))
    assert await redis.smembers(keys.user_sessions(USER)) == {"session-phone"}


async def test_a_single_close_after_close_all_is_already_closed(
    client: Client, redis: Redis, keys: Keys, sessions: list[str]
) -> None:
    await info_of(
        await client.post(CLOSE_ALL_PATH, headers=close_all_headers(), data=close_all_body()),
        200,
        "success",
    )
    resp = await client.post(CLOSE_PATH, headers=app_headers(TOKEN, "session-tablet"), data=BODY)
    info = await info_of(resp, 200, "info")
    assert info["title"] == "Session already closed"
    assert len(await outbox_entries(redis, keys)) == 3


async def test_nothing_to_close_is_200_info_with_zero(
    client: Client, redis: Redis, keys: Keys
) -> None:
    await open_session(redis, keys, "someone-else", "session-theirs", "their-token")
    await create_token(redis, keys, USER, TOKEN, 600)
    async with Unchanged(redis, keys):
        resp = await client.post(
            CLOSE_ALL_PATH,
            headers=close_all_headers(**{"Accept-Language": "es"}),
            data=close_all_body(),
        )
        info = await info_of(resp, 200, "info")
    assert info == {
        "type": "info",
        "title": "No hay sesiones que cerrar",
        "message": "No había sesiones abiertas que cerrar.",
        "sessionId": "",
        "closedSessions": 0,
    }


async def test_spanish_success_reply(client: Client, sessions: list[str]) -> None:
    resp = await client.post(
        CLOSE_ALL_PATH,
        headers=close_all_headers(**{"Accept-Language": "es"}),
        data=close_all_body(),
    )
    info = await info_of(resp, 200, "success")
    assert (info["title"], info["message"]) == (
        "¡Sesiones cerradas!",
        "¡Tus sesiones se cerraron correctamente!",
    )


def test_someone_0_shares_the_users_bucket() -> None:
    assert bucket_of("someone-0") == bucket_of(USER) != bucket_of("someone-else")


@pytest.mark.parametrize("other", ["someone-else", "someone-0"])  # another bucket, USER's
async def test_other_users_stale_and_expired_sessions_are_not_closed(
    client: Client, redis: Redis, keys: Keys, sessions: list[str], other: str
) -> None:
    await open_session(redis, keys, other, "session-theirs", "their-token")
    # In the user's set but not theirs, gone, and past its logical end.
    await redis.sadd(keys.user_sessions(USER), "session-theirs", "session-gone-1")
    await redis.hset(
        keys.session(USER, "session-expired"),
        mapping={"user_id": USER, "expires_at": time.time() - 5},
    )
    await redis.sadd(keys.user_sessions(USER), "session-expired")

    resp = await client.post(CLOSE_ALL_PATH, headers=close_all_headers(), data=close_all_body())

    assert (await info_of(resp, 200, "success"))["closedSessions"] == 3
    assert sorted(e["session_id"] for e in await outbox_entries(redis, keys)) == sorted(sessions)
    assert await redis.exists(keys.session(other, "session-theirs"))
    assert await redis.exists(keys.session(USER, "session-expired"))  # the sweeper's to expire
    # The gone one is dropped from the set without an event. So is the other user's when
    # it is in another bucket (for this user it does not exist); in the user's own bucket
    # it is left, like the expired one, which is the sweeper's.
    left = {"session-expired"} | (
        {"session-theirs"} if bucket_of(other) == bucket_of(USER) else set()
    )
    assert await redis.smembers(keys.user_sessions(USER)) == left


@pytest.mark.parametrize(
    "keep",
    ["session-unknown", "session-theirs", "session-closed", "session-expired"],
)
async def test_keep_current_with_a_session_not_open_for_the_user_is_404_and_closes_nothing(
    client: Client, redis: Redis, keys: Keys, sessions: list[str], keep: str
) -> None:
    await open_session(redis, keys, "someone-else", "session-theirs", "their-token")
    await redis.hset(
        keys.tombstone(USER, "session-closed"), mapping={"user_id": USER, "event_id": "x"}
    )
    await redis.hset(
        keys.session(USER, "session-expired"),
        mapping={"user_id": USER, "expires_at": time.time() - 5},
    )
    async with Unchanged(redis, keys):
        resp = await client.post(
            CLOSE_ALL_PATH, headers=close_all_headers(keep), data=close_all_body(keepCurrent=True)
        )
        info = await info_of(resp, 404, "error")
    assert info["sessionId"] == keep


@pytest.mark.parametrize(
    ("headers", "body", "field"),
    [
        (close_all_headers(), close_all_body(keepCurrent=True), "SessionID"),
        (close_all_headers("bad id!"), close_all_body(), "SessionID"),
        (close_all_headers(), close_all_body(keepCurrent="true"), "requestContent.keepCurrent"),
        (close_all_headers(), close_all_body(keepCurrent=1), "requestContent.keepCurrent"),
        (close_all_headers(), b'{"requestContent": []}', "requestContent"),
        (close_all_headers(), b"{}", "requestContent"),
        (close_all_headers(AppVersion="1.0"), close_all_body(), "AppVersion"),
    ],
)
async def test_invalid_request_is_400_naming_the_field_and_changes_nothing(
    client: Client,
    redis: Redis,
    keys: Keys,
    sessions: list[str],
    headers: dict[str, str],
    body: bytes,
    field: str,
) -> None:
    async with Unchanged(redis, keys):
        resp = await client.post(CLOSE_ALL_PATH, headers=headers, data=body)
        info = await info_of(resp, 400, "error")
    assert list(info["errors"]) == [field]


async def test_the_checks_before_validation_answer_as_for_a_close(
    client: Client, redis: Redis, keys: Keys, sessions: list[str]
) -> None:
    async with Unchanged(redis, keys):
        too_large = await client.post(
            CLOSE_ALL_PATH, headers=close_all_headers(), data=b" " * (16 * 1024 + 1)
        )
        await info_of(too_large, 413, "error")
        not_json = await client.post(
            CLOSE_ALL_PATH,
            headers=close_all_headers(**{"Content-Type": "text/plain"}),
            data=close_all_body(),
        )
        await info_of(not_json, 415, "error")
        no_auth = close_all_headers()
        del no_auth["Authorization"]
        unauthorized = await client.post(CLOSE_ALL_PATH, headers=no_auth, data=close_all_body())
        await info_of(unauthorized, 401, "error")
        assert "WWW-Authenticate" in unauthorized.headers
        unknown = await client.post(
            CLOSE_ALL_PATH,
            headers=close_all_headers(Authorization="Bearer not-a-token"),
            data=close_all_body(),
        )
        await info_of(unknown, 401, "error")
        assert "WWW-Authenticate" in unknown.headers
        wrong_method = await client.get(CLOSE_ALL_PATH)
        await info_of(wrong_method, 405, "error")


async def test_a_key_of_the_wrong_type_fails_the_whole_step_and_writes_nothing(
    client: Client, redis: Redis, keys: Keys, sessions: list[str]
) -> None:
    # One session of the user has a tombstone key that is not a hash.
    await redis.set(keys.tombstone(USER, "session-laptop"), "not a hash")
    async with Unchanged(redis, keys):
        resp = await client.post(CLOSE_ALL_PATH, headers=close_all_headers(), data=close_all_body())
        await info_of(resp, 500, "error")
    await redis.delete(keys.tombstone(USER, "session-laptop"))
    retry = await client.post(CLOSE_ALL_PATH, headers=close_all_headers(), data=close_all_body())
    assert (await info_of(retry, 200, "success"))["closedSessions"] == 3


async def test_close_all_racing_single_closes_gives_one_event_per_session(
    settings: Settings,
    redis: Redis,
    keys: Keys,
    amqp_cleanup: None,
    aiohttp_client: AiohttpClient,
) -> None:
    """Two app instances, each with its own Redis client (as two API processes would
    have), so the close-alls and the single closes do not share a script run."""
    quiet = dataclasses.replace(settings, relay_enabled=False)
    first: Client = await aiohttp_client(create_app(quiet))
    second: Client = await aiohttp_client(create_app(quiet))
    sids = [f"session-race-{i:03d}" for i in range(60)]
    for sid in sids:
        await open_session(redis, keys, USER, sid, TOKEN)

    def post(c: Client, path: str, headers: dict[str, str], body: bytes) -> Awaitable[Any]:
        return c.post(path, headers=headers, data=body)

    requests: list[Awaitable[ClientResponse]] = []
    for i, sid in enumerate(sids):
        c = first if i % 2 else second
        requests.append(post(c, CLOSE_PATH, app_headers(TOKEN, sid), BODY))
        if i % 15 == 0:
            other = second if i % 2 else first
            requests.append(post(other, CLOSE_ALL_PATH, close_all_headers(), close_all_body()))
    replies = await asyncio.gather(*requests)
    statuses = Counter(r.status for r in replies)
    assert statuses == {200: len(requests)}

    entries = await outbox_entries(redis, keys)
    per_session = Counter(e["session_id"] for e in entries)
    assert per_session == dict.fromkeys(sids, 1)
    closed_by_all = 0
    for reply in replies:
        if reply.url.path == CLOSE_ALL_PATH:
            closed_by_all += (await reply.json())["info"]["closedSessions"]
    assert closed_by_all == sum(1 for e in entries if e["reason"] == "user_logout_all")
