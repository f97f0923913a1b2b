"""Helpers for tests of the close endpoint: the apps' request, sessions written the way
the login side writes them, a snapshot of a test's Redis keys, and a reply's info."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from service.schemas import InfoReplySchema
from session_close.cli import create_session, create_token
from session_close.keys import Keys

CLOSE_PATH = "/v1.0/session/close"
# What the mobile apps send today, literally (docs/http-api.md).
APP_CONTENT_TYPE = "application/json; multipart/form-data;"
BODY = b'{ "requestContent": { } }'

Client = TestClient[web.Request, web.Application]

# The user, session and token of the `session` fixture (tests/api/conftest.py).
USER = "user-1"
SID = "session-0001"
TOKEN = "token-of-user-1"


def app_headers(token: str, session_id: str, **extra: str) -> dict[str, str]:
    headers = {
        "Content-Type": APP_CONTENT_TYPE,
        "Sessionid": session_id,
        "OS": "Android",
        "AppVersion": "1.0.10",
        "Authorization": f"Basic {token}",
    }
    headers.update(extra)
    return headers


async def open_session(
    redis: Redis, keys: Keys, user_id: str, session_id: str, token: str, **fields: Any
) -> None:
    await create_token(redis, keys, user_id, token, 600)
    await create_session(redis, keys, user_id, session_id, ttl=600, **fields)


async def snapshot(redis: Redis, prefix: str) -> dict[str, Any]:
    """Every key of the test's prefix with its type and content (for a stream, its last id),
    but the outbox relays' heartbeats, which come and go with the relays, not with closes."""
    state: dict[str, Any] = {}
    heartbeats = Keys(prefix).relay_heartbeat("")
    async for key in redis.scan_iter(match=f"{prefix}*", count=1000):
        if key.startswith(heartbeats):
            continue
        kind = await redis.type(key)
        value: Any
        if kind == "hash":
            value = await redis.hgetall(key)
        elif kind == "set":
            value = sorted(await redis.smembers(key))
        elif kind == "string":
            value = await redis.get(key)
        elif kind == "stream":
            # The relay deletes entries as it publishes them; the last id still tells
            # whether anything was ever appended.
            value = (await redis.xinfo_stream(key))["last-generated-id"]
        else:
            value = kind
        state[key] = (kind, value)
    return state


async def outbox_entries(redis: Redis, keys: Keys) -> list[dict[str, str]]:
    """The fields of every entry still in the outboxes (every bucket's), oldest first by
    entry id (Redis's clock at the write; a user's entries are all in one bucket, so
    theirs keep their order)."""
    pipe = redis.pipeline(transaction=False)
    for outbox in keys.outboxes:
        pipe.xrange(outbox)
    streams: list[list[tuple[str, dict[str, str]]]] = await pipe.execute()
    entries = [entry for stream in streams for entry in stream]
    entries.sort(key=lambda entry: tuple(int(part) for part in entry[0].split("-")))
    return [fields for _, fields in entries]


async def queue_depth(amqp_url: str, queue: str) -> int:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        count = declared.declaration_result.message_count
        assert count is not None
        return int(count)


async def info_of(resp: ClientResponse, status: int, info_type: str) -> dict[str, Any]:
    """The reply's info object, after checking the status and the shape every reply has."""
    body = await resp.text()
    assert resp.status == status, body
    assert resp.content_type == "application/json"
    reply = json.loads(body)
    assert InfoReplySchema().validate(reply) == {}, reply
    info: dict[str, Any] = reply["info"]
    assert info["type"] == info_type
    assert resp.headers["X-Request-ID"]
    return info


@asynccontextmanager
async def state_unchanged(redis: Redis, keys: Keys) -> AsyncIterator[None]:
    before = await snapshot(redis, keys.prefix)
    yield
    assert await snapshot(redis, keys.prefix) == before
