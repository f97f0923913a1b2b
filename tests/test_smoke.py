from __future__ import annotations

from aiohttp import web
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from core.cli import create_session, create_token
from core.keys import Keys


async def test_close_succeeds_for_an_open_session(
    client: TestClient[web.Request, web.Application], redis: Redis, keys: Keys
) -> None:
    await create_token(redis, keys, "u1", "token-1", 60)
    await create_session(redis, keys, "u1", "session-1", ttl=60)
    resp = await client.post(
        "/v1.0/session/close",
        headers={
            "Content-Type": "application/json; multipart/form-data;",
            "Sessionid": "session-1",
            "Authorization": "Basic token-1",
        },
        data=b'{"requestContent": {}}',
    )
    assert resp.status == 200
    assert (await resp.json())["info"]["type"] == "success"
