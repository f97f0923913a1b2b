"""What every reply of the close endpoint carries whatever happened: 503 with
Retry-After while Redis is away, 500 without internal detail, the request id, and the
language the client asked for."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Callable

import pytest
from aiohttp import web
from aiohttp.pytest_plugin import AiohttpClient
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from service.app import create_app
from service.appkeys import AMQP
from session_close.keys import Keys
from session_close.settings import Settings
from tests.conftest import through
from tests.support.closing import (
    BODY,
    CLOSE_PATH,
    SID,
    TOKEN,
    USER,
    Client,
    app_headers,
    info_of,
    open_session,
    state_unchanged,
)
from tests.support.proxy import Mode, TcpProxy

# Redis unreachable or timing out


@pytest.fixture
async def proxied_client(
    settings: Settings,
    redis: Redis,
    redis_proxy: TcpProxy,
    amqp_cleanup: None,
    aiohttp_client: AiohttpClient,
) -> Client:
    """The real app, its Redis link through redis_proxy."""
    proxied = dataclasses.replace(settings, redis_url=through(settings.redis_url, redis_proxy))
    test_client: TestClient[web.Request, web.Application] = await aiohttp_client(
        create_app(proxied)
    )
    await asyncio.wait_for(asyncio.shield(test_client.app[AMQP]), 10)
    return test_client


@pytest.mark.fault
@pytest.mark.parametrize("mode", ["reset", "blackhole"])
async def test_redis_unreachable_is_503_with_retry_after_and_recovers_without_restart(
    proxied_client: Client,
    redis: Redis,
    keys: Keys,
    settings: Settings,
    redis_proxy: TcpProxy,
    mode: Mode,
    report_counts: Callable[..., None],
) -> None:
    await open_session(redis, keys, USER, SID, TOKEN)
    await open_session(redis, keys, USER, "session-0002", TOKEN)
    resp = await proxied_client.post(CLOSE_PATH, headers=app_headers(TOKEN, SID), data=BODY)
    await info_of(resp, 200, "success")

    redis_proxy.cut(mode)
    slowest, sent, unavailable = 0.0, 0, 0
    for _ in range(2):
        started = time.monotonic()
        resp = await proxied_client.post(
            CLOSE_PATH, headers=app_headers(TOKEN, "session-0002"), data=BODY
        )
        sent += 1
        elapsed = time.monotonic() - started
        slowest = max(slowest, elapsed)
        info = await info_of(resp, 503, "error")
        unavailable += resp.status == 503
        assert int(resp.headers["Retry-After"]) >= 1
        # REDIS_TIMEOUT_SECONDS and one reconnect, with room for a busy 2-core machine
        assert elapsed < 2 * settings.redis_timeout_seconds + 5
        assert info["sessionId"] == "session-0002"
        assert "redis" not in json.dumps(info).lower()

    redis_proxy.restore()
    await open_session(redis, keys, USER, "session-0003", TOKEN)
    resp = await proxied_client.post(
        CLOSE_PATH, headers=app_headers(TOKEN, "session-0003"), data=BODY
    )
    await info_of(resp, 200, "success")
    report_counts(
        sent_while_cut=sent, unavailable_503=unavailable, slowest_503_ms=round(slowest * 1000)
    )
    assert (sent, unavailable) == (2, 2)
    assert slowest < 2 * settings.redis_timeout_seconds + 5


# Anything unexpected


async def test_unexpected_error_is_500_without_internal_detail(
    client: Client, redis: Redis, keys: Keys, session: str
) -> None:
    # The login side wrote a token of the wrong type: the script fails inside Redis.
    await redis.set(keys.token("string-token"), USER)
    async with state_unchanged(redis, keys):
        resp = await client.post(
            CLOSE_PATH, headers=app_headers("string-token", session), data=BODY
        )
        info = await info_of(resp, 500, "error")
    text = json.dumps(info).lower()
    for detail in ("wrongtype", "traceback", "redis", "lua", "script", "error:"):
        assert detail not in text
    assert info["sessionId"] == session


# Replies: request id, language


async def test_request_id_is_echoed_on_every_reply(client: Client, session: str) -> None:
    for method, path in (("POST", CLOSE_PATH), ("GET", "/nowhere"), ("GET", CLOSE_PATH)):
        resp = await client.request(
            method,
            path,
            headers=app_headers(TOKEN, session, **{"X-Request-ID": "req-abc-123"}),
            data=BODY,
        )
        assert resp.headers["X-Request-ID"] == "req-abc-123"


async def test_request_id_is_generated_when_missing_or_unusable(client: Client) -> None:
    seen = set()
    for sent in (None, "", "has spaces", "x" * 500):
        headers = {} if sent is None else {"X-Request-ID": sent}
        resp = await client.post("/nowhere", headers=headers)
        generated = resp.headers["X-Request-ID"]
        assert generated
        assert generated != sent
        seen.add(generated)
    assert len(seen) == 4


@pytest.mark.parametrize("accept_language", ["es", "es-ES,es;q=0.9,en;q=0.5", "ES"])
async def test_spanish_replies_for_accept_language_es(
    client: Client, session: str, accept_language: str
) -> None:
    lang = {"Accept-Language": accept_language}
    resp = await client.post(CLOSE_PATH, headers=app_headers(TOKEN, session, **lang), data=BODY)
    info = await info_of(resp, 200, "success")
    assert info["title"] == "¡Sesión cerrada!"
    assert info["message"] == "¡La sesión se ha cerrado correctamente!"
    resp = await client.get("/nowhere", headers=lang)
    info = await info_of(resp, 404, "error")
    assert info["title"] == "No encontrado"


@pytest.mark.parametrize("accept_language", [None, "en", "fr", "en;q=0.9,es;q=0.1"])
async def test_english_replies_otherwise(
    client: Client, session: str, accept_language: str | None
) -> None:
    lang = {} if accept_language is None else {"Accept-Language": accept_language}
    resp = await client.post(CLOSE_PATH, headers=app_headers(TOKEN, session, **lang), data=BODY)
    info = await info_of(resp, 200, "success")
    assert info["title"] == "Session closed!"
