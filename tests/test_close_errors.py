"""POST /v1.0/session/close, row by row through the error table of docs/http-api.md, in its order:
each test also sends what would fail a later row, so it proves the row answers first,
and checks that the rejected request left the test's Redis keys exactly as they were."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import ClientResponse, web
from aiohttp.pytest_plugin import AiohttpClient
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from service.app import create_app
from service.appkeys import AMQP, METRICS
from service.schemas import MAX_BODY_BYTES, InfoReplySchema
from service.server import listening
from session_close.keys import Keys
from session_close.settings import Settings
from tests.conftest import through
from tests.support.closing import (
    APP_CONTENT_TYPE,
    BODY,
    CLOSE_PATH,
    Client,
    app_headers,
    open_session,
    snapshot,
)
from tests.support.proxy import Mode, TcpProxy
from tests.support.waiting import wait_until

USER = "user-1"
SID = "session-0001"
TOKEN = "token-of-user-1"


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


@pytest.fixture
async def session(redis: Redis, keys: Keys) -> str:
    await open_session(redis, keys, USER, SID, TOKEN, os="iOS", app_version="1.0.0")
    return SID


# 1. unknown path / wrong method


async def test_unknown_path_is_404_with_info(client: Client, redis: Redis, keys: Keys) -> None:
    async with state_unchanged(redis, keys):
        resp = await client.post("/v1.0/session/open", headers=app_headers(TOKEN, SID), data=BODY)
        info = await info_of(resp, 404, "error")
    assert info["title"] == "Not found"


async def test_wrong_method_is_405_with_info_and_allow(
    client: Client, redis: Redis, keys: Keys, session: str
) -> None:
    async with state_unchanged(redis, keys):
        resp = await client.get(CLOSE_PATH, headers=app_headers(TOKEN, session))
        info = await info_of(resp, 405, "error")
        resp = await client.delete(CLOSE_PATH, headers=app_headers(TOKEN, session), data=BODY)
        await info_of(resp, 405, "error")
    assert "POST" in resp.headers["Allow"]
    assert info["sessionId"] == session


# 2. body over 16 KiB


def oversized_body() -> bytes:
    return b'{"requestContent": {}, "pad": "' + b"x" * MAX_BODY_BYTES + b'"}'


async def test_body_over_16_kib_is_413_before_content_type_and_authorization(
    client: Client, redis: Redis, keys: Keys, session: str
) -> None:
    async with state_unchanged(redis, keys):
        resp = await client.post(CLOSE_PATH, headers={"Sessionid": session}, data=oversized_body())
        await info_of(resp, 413, "error")
        resp = await client.post(
            CLOSE_PATH, headers=app_headers(TOKEN, session), data=oversized_body()
        )
        info = await info_of(resp, 413, "error")
    assert info["sessionId"] == session


async def test_chunked_body_over_16_kib_is_413(
    client: Client, redis: Redis, keys: Keys, session: str
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        body = oversized_body()
        for start in range(0, len(body), 4096):
            yield body[start : start + 4096]

    async with state_unchanged(redis, keys):
        resp = await client.post(CLOSE_PATH, headers=app_headers(TOKEN, session), data=chunks())
        await info_of(resp, 413, "error")
    assert "Content-Length" not in resp.request_info.headers


async def test_body_of_exactly_16_kib_is_accepted(
    client: Client, redis: Redis, keys: Keys, session: str
) -> None:
    head, tail = b'{"requestContent": {}, "pad": "', b'"}'
    body = head + b"x" * (MAX_BODY_BYTES - len(head) - len(tail)) + tail
    assert len(body) == MAX_BODY_BYTES
    resp = await client.post(CLOSE_PATH, headers=app_headers(TOKEN, session), data=body)
    await info_of(resp, 200, "success")


# 3. Content-Type missing or not JSON


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "multipart/form-data", "application/jsonp", "application/json-patch"],
)
async def test_content_type_missing_or_not_json_is_415_before_authorization(
    client: Client, redis: Redis, keys: Keys, session: str, content_type: str | None
) -> None:
    headers = {"Sessionid": session}  # and no Authorization: 415 answers first
    if content_type is not None:
        headers["Content-Type"] = content_type
    async with state_unchanged(redis, keys):
        resp = await client.post(CLOSE_PATH, headers=headers, data=BODY)
        await info_of(resp, 415, "error")
        headers["Authorization"] = f"Basic {TOKEN}"
        resp = await client.post(CLOSE_PATH, headers=headers, data=BODY)
        await info_of(resp, 415, "error")


@pytest.mark.parametrize(
    "content_type", [APP_CONTENT_TYPE, "application/json", "Application/JSON; charset=utf-8"]
)
async def test_json_content_types_are_accepted(
    client: Client, session: str, content_type: str
) -> None:
    headers = app_headers(TOKEN, session, **{"Content-Type": content_type})
    resp = await client.post(CLOSE_PATH, headers=headers, data=BODY)
    await info_of(resp, 200, "success")


# 4. Authorization missing or malformed


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        TOKEN,
        "Basic",
        "Basic ",
        "Token abc",
        "Basic two words",
        "Basic tök",
        "Basic " + "a" * 513,
    ],
)
async def test_authorization_missing_or_malformed_is_401_with_www_authenticate(
    client: Client, redis: Redis, keys: Keys, session: str, authorization: str | None
) -> None:
    headers = app_headers(TOKEN, "bad sid!", AppVersion="v1")  # 400 material: 401 answers first
    del headers["Authorization"]
    if authorization is not None:
        headers["Authorization"] = authorization
    async with state_unchanged(redis, keys):
        resp = await client.post(CLOSE_PATH, headers=headers, data=b"[]")
        info = await info_of(resp, 401, "error")
    challenge = resp.headers["WWW-Authenticate"]
    assert "Basic" in challenge
    assert "Bearer" in challenge
    assert info["sessionId"] == ""


# 5. SessionID / OS / AppVersion / body invalid


@pytest.mark.parametrize(
    ("header", "value", "field"),
    [
        ("Sessionid", "short", "SessionID"),
        ("Sessionid", "has space here", "SessionID"),
        ("Sessionid", "semi;colon!", "SessionID"),
        ("Sessionid", "s" * 257, "SessionID"),
        ("OS", "", "OS"),
        ("OS", "x" * 65, "OS"),
        ("AppVersion", "1.0", "AppVersion"),
        ("AppVersion", "01.0.0", "AppVersion"),
        ("AppVersion", "v1.0.0", "AppVersion"),
        ("AppVersion", "1.0.0-", "AppVersion"),
        ("AppVersion", "1.0.0-01", "AppVersion"),
        ("AppVersion", "1.0.0+", "AppVersion"),
        ("AppVersion", "1.0.0.0", "AppVersion"),
    ],
)
async def test_invalid_header_is_400_with_errors_before_the_token_check(
    client: Client, redis: Redis, keys: Keys, session: str, header: str, value: str, field: str
) -> None:
    # An unknown token: the 400 must answer before the token is looked up.
    headers = app_headers("unknown-token", session, **{header: value})
    async with state_unchanged(redis, keys):
        resp = await client.post(CLOSE_PATH, headers=headers, data=BODY)
        info = await info_of(resp, 400, "error")
    assert list(info["errors"]) == [field]
    assert all(isinstance(m, str) for m in info["errors"][field])
    assert info["sessionId"] == (session if field != "SessionID" else "")


async def test_missing_session_id_is_400(
    client: Client, redis: Redis, keys: Keys, session: str
) -> None:
    headers = app_headers(TOKEN, session)
    del headers["Sessionid"]
    async with state_unchanged(redis, keys):
        resp = await client.post(CLOSE_PATH, headers=headers, data=BODY)
        info = await info_of(resp, 400, "error")
    assert list(info["errors"]) == ["SessionID"]
    assert info["sessionId"] == ""


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[]",
        b'"requestContent"',
        b"{}",
        b'{"requestContent": []}',
        b'{"requestContent": "x"}',
        b'{"requestContent": null}',
        b"\xff\xfe",
    ],
)
async def test_invalid_body_is_400_with_errors(
    client: Client, redis: Redis, keys: Keys, session: str, body: bytes
) -> None:
    async with state_unchanged(redis, keys):
        resp = await client.post(CLOSE_PATH, headers=app_headers(TOKEN, session), data=body)
        info = await info_of(resp, 400, "error")
    assert set(info["errors"]) <= {"body", "requestContent"}
    assert info["errors"]


async def test_every_invalid_field_is_reported_at_once(client: Client, session: str) -> None:
    headers = app_headers(TOKEN, "bad!", OS="", AppVersion="1.0")
    resp = await client.post(CLOSE_PATH, headers=headers, data=b"{}")
    info = await info_of(resp, 400, "error")
    assert set(info["errors"]) == {"SessionID", "OS", "AppVersion", "requestContent"}


@pytest.mark.parametrize(
    "body",
    [
        b'{"requestContent": {"ignored": [1, 2]}}',
        b'{"requestContent": {}, "other": "ignored"}',
    ],
)
async def test_keys_inside_request_content_and_other_keys_are_ignored(
    client: Client, session: str, body: bytes
) -> None:
    resp = await client.post(CLOSE_PATH, headers=app_headers(TOKEN, session), data=body)
    await info_of(resp, 200, "success")


@pytest.mark.parametrize("version", ["1.0.10", "2.0.0-rc.1+build.5", "0.0.0", "1.2.3-alpha-1"])
async def test_full_semver_app_versions_are_accepted(
    client: Client, session: str, version: str
) -> None:
    resp = await client.post(
        CLOSE_PATH, headers=app_headers(TOKEN, session, AppVersion=version), data=BODY
    )
    await info_of(resp, 200, "success")


async def test_os_and_app_version_are_optional(client: Client, session: str) -> None:
    headers = app_headers(TOKEN, session)
    del headers["OS"], headers["AppVersion"]
    resp = await client.post(CLOSE_PATH, headers=headers, data=BODY)
    await info_of(resp, 200, "success")


# 6. token unknown or expired


async def test_unknown_token_is_401_before_the_session_check(
    client: Client, redis: Redis, keys: Keys, session: str
) -> None:
    async with state_unchanged(redis, keys):
        for sid in (session, "no-such-session"):
            resp = await client.post(
                CLOSE_PATH, headers=app_headers("unknown-token", sid), data=BODY
            )
            info = await info_of(resp, 401, "error")
            assert info["sessionId"] == sid
    assert "WWW-Authenticate" in resp.headers


async def test_expired_token_is_401(client: Client, redis: Redis, keys: Keys, session: str) -> None:
    await redis.pexpire(keys.token(TOKEN), 1)
    await wait_until(
        lambda: _gone(redis, keys.token(TOKEN)), "the token to expire", within=5, step=0.005
    )
    async with state_unchanged(redis, keys):
        resp = await client.post(CLOSE_PATH, headers=app_headers(TOKEN, session), data=BODY)
        await info_of(resp, 401, "error")
    assert await redis.exists(keys.session(session))


async def test_token_without_user_id_is_401(
    client: Client, redis: Redis, keys: Keys, session: str
) -> None:
    await redis.hset(keys.token("odd-token"), mapping={"scope": "x"})
    async with state_unchanged(redis, keys):
        resp = await client.post(CLOSE_PATH, headers=app_headers("odd-token", session), data=BODY)
        await info_of(resp, 401, "error")


async def _gone(redis: Redis, key: str) -> bool:
    return not await redis.exists(key)


# 7. session unknown, expired, or owned by another user


async def test_unknown_expired_and_foreign_sessions_are_indistinguishable_404s(
    client: Client, redis: Redis, keys: Keys, session: str
) -> None:
    await open_session(redis, keys, "user-2", "session-of-user-2", "token-of-user-2")
    await open_session(redis, keys, USER, "session-expiring", TOKEN)
    await redis.pexpire(keys.session("session-expiring"), 1)
    await wait_until(
        lambda: _gone(redis, keys.session("session-expiring")), "expiry", within=5, step=0.005
    )
    replies = []
    async with state_unchanged(redis, keys):
        for sid in ("session-unknown", "session-expiring", "session-of-user-2"):
            resp = await client.post(CLOSE_PATH, headers=app_headers(TOKEN, sid), data=BODY)
            info = await info_of(resp, 404, "error")
            assert info.pop("sessionId") == sid
            replies.append(info)
    assert replies[0] == replies[1] == replies[2]
    assert await redis.sismember(keys.user_sessions("user-2"), "session-of-user-2")


# 8. already closed by this service, same user, within the tombstone retention


async def test_closing_again_is_200_info(
    client: Client, redis: Redis, keys: Keys, settings: Settings, session: str
) -> None:
    resp = await client.post(CLOSE_PATH, headers=app_headers(TOKEN, session), data=BODY)
    await info_of(resp, 200, "success")
    ttl = await redis.ttl(keys.tombstone(session))
    assert settings.tombstone_ttl_seconds - 5 <= ttl <= settings.tombstone_ttl_seconds
    async with state_unchanged(redis, keys):
        resp = await client.post(CLOSE_PATH, headers=app_headers(TOKEN, session), data=BODY)
        info = await info_of(resp, 200, "info")
    assert info["sessionId"] == session
    assert info["title"] == "Session already closed"


async def test_closing_again_after_the_tombstone_expired_is_404(
    client: Client, redis: Redis, keys: Keys, session: str
) -> None:
    resp = await client.post(CLOSE_PATH, headers=app_headers(TOKEN, session), data=BODY)
    await info_of(resp, 200, "success")
    await redis.pexpire(keys.tombstone(session), 1)
    await wait_until(lambda: _gone(redis, keys.tombstone(session)), "expiry", within=5, step=0.005)
    resp = await client.post(CLOSE_PATH, headers=app_headers(TOKEN, session), data=BODY)
    await info_of(resp, 404, "error")


# 9. open and owned by the token's user: closed now


@pytest.mark.parametrize("header_name", ["SessionID", "Sessionid", "sessionid", "SESSIONID"])
@pytest.mark.parametrize("scheme", ["Basic", "Bearer", "basic"])
async def test_open_session_is_closed_with_success(
    client: Client, redis: Redis, keys: Keys, settings: Settings, header_name: str, scheme: str
) -> None:
    await open_session(redis, keys, USER, SID, TOKEN, device_id="device-1")
    await redis.sadd(keys.user_sessions(USER), "session-other")
    headers = app_headers(TOKEN, SID, Authorization=f"{scheme} {TOKEN}")
    del headers["Sessionid"]
    headers[header_name] = SID
    resp = await client.post(CLOSE_PATH, headers=headers, data=BODY)
    info = await info_of(resp, 200, "success")
    assert info == {
        "type": "success",
        "title": "Session closed!",
        "message": "The session has been closed successfully!",
        "sessionId": SID,
    }
    assert not await redis.exists(keys.session(SID))
    assert await redis.smembers(keys.user_sessions(USER)) == {"session-other"}
    assert await redis.hget(keys.tombstone(SID), "user_id") == USER
    assert await redis.ttl(keys.tombstone(SID)) > 0
    assert await redis.hgetall(keys.token(TOKEN)) == {"user_id": USER}  # the token lives on


async def test_longest_token_and_session_id_are_accepted(
    client: Client, redis: Redis, keys: Keys
) -> None:
    token, sid = "~" * 512, "s" * 256
    await open_session(redis, keys, USER, sid, token)
    resp = await client.post(CLOSE_PATH, headers=app_headers(token, sid), data=BODY)
    await info_of(resp, 200, "success")


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


# HTTP hygiene: stalled and vanishing clients, requests aiohttp's parser rejects. These
# run the real server (service.server.listening, as `python -m service` does) on a free
# port of 127.0.0.1 and talk to it with raw sockets.

READ_TIMEOUT = 1.0
# Far above every bound measured below: generous for a busy 2-core machine.
WITHIN = 15.0


@asynccontextmanager
async def served(
    settings: Settings, **overrides: Any
) -> AsyncIterator[tuple[web.Application, int]]:
    configured = dataclasses.replace(
        settings,
        http_host="127.0.0.1",
        http_port=0,
        relay_enabled=False,
        **{"http_read_timeout_seconds": READ_TIMEOUT, **overrides},
    )
    app = create_app(configured)
    async with listening(app, configured) as port:
        await asyncio.wait_for(asyncio.shield(app[AMQP]), 10)
        yield app, port


async def seconds_until_closed(reader: asyncio.StreamReader) -> tuple[float, bytes]:
    """How long until the server closes the connection, and what it sent before."""
    begun = time.monotonic()
    received = await asyncio.wait_for(reader.read(), WITHIN)
    return time.monotonic() - begun, received


def request_count(app: web.Application, status: int) -> float:
    total = 0.0
    for family in app[METRICS].registry.collect():
        for s in family.samples:
            if s.name == "http_requests_total" and s.labels["status"] == str(status):
                total += s.value
    return total


CLOSE_HEAD = f"POST {CLOSE_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"


async def test_a_client_stalled_mid_headers_is_disconnected_after_the_read_timeout(
    settings: Settings, redis: Redis, amqp_cleanup: None
) -> None:
    # keep-alive far longer than the test's bound: only the read timeout can close it
    async with served(settings, http_keepalive_timeout_seconds=120.0) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write((CLOSE_HEAD + "Authorization: Basic tok").encode())  # half a header block
        elapsed, received = await seconds_until_closed(reader)
        writer.close()
    assert received == b""
    assert READ_TIMEOUT * 0.9 <= elapsed < WITHIN


async def test_a_client_stalled_mid_body_is_disconnected_and_counted_as_gone(
    settings: Settings, redis: Redis, amqp_cleanup: None, report_counts: Callable[..., None]
) -> None:
    async with served(settings, http_keepalive_timeout_seconds=120.0) as (app, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            (CLOSE_HEAD + f"Authorization: Basic {TOKEN}\r\nContent-Length: 100\r\n\r\n{{").encode()
        )
        elapsed, received = await seconds_until_closed(reader)
        writer.close()
        await wait_until(
            lambda: request_count(app, 499) == 1, "the 499 to be counted", within=WITHIN
        )
        gone, unavailable, errors = (request_count(app, s) for s in (499, 503, 500))
    report_counts(client_gone_499=gone, unavailable_503=unavailable, internal_500=errors)
    assert received == b""
    assert READ_TIMEOUT * 0.9 <= elapsed < WITHIN
    assert (gone, unavailable, errors) == (1, 0, 0)


async def test_an_idle_keepalive_connection_is_closed_after_its_timeout(
    settings: Settings, redis: Redis, amqp_cleanup: None
) -> None:
    keepalive = 1.0
    async with served(
        settings, http_keepalive_timeout_seconds=keepalive, http_read_timeout_seconds=120.0
    ) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WITHIN)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert b"keep-alive" in head.lower() or b"connection: close" not in head.lower()
        elapsed, _ = await seconds_until_closed(reader)
        writer.close()
    assert keepalive * 0.9 <= elapsed < WITHIN


@pytest.mark.fault
async def test_a_client_that_disconnects_mid_request_is_counted_499_not_503(
    settings: Settings,
    redis: Redis,
    keys: Keys,
    amqp_cleanup: None,
    redis_proxy: TcpProxy,
    caplog: pytest.LogCaptureFixture,
    report_counts: Callable[..., None],
) -> None:
    caplog.set_level(logging.DEBUG)
    await open_session(redis, keys, USER, SID, TOKEN)
    proxied = through(settings.redis_url, redis_proxy)
    async with served(settings, redis_url=proxied, redis_timeout_seconds=2.0) as (app, port):
        redis_proxy.cut("blackhole")  # the close waits on a Redis that hangs...
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            body = BODY.decode()
            writer.write(
                (
                    CLOSE_HEAD + f"Authorization: Basic {TOKEN}\r\nSessionid: {SID}\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n{body}"
                ).encode()
            )
            await wait_until(
                lambda: redis_proxy.open_connections > 0, "the close in Redis", within=WITHIN
            )
            writer.transport.abort()  # ...and the client gives up meanwhile
            await wait_until(
                lambda: request_count(app, 499) == 1, "the 499 to be counted", within=WITHIN
            )
        finally:
            redis_proxy.restore()
        gone, unavailable = request_count(app, 499), request_count(app, 503)
    report_counts(client_gone_499=gone, unavailable_503=unavailable)
    assert (gone, unavailable) == (1, 0)
    messages = [r.getMessage() for r in caplog.records]
    assert "client disconnected before its reply" in messages
    assert "Redis unavailable" not in messages


def unreadable_token() -> str:
    return "tok" + uuid.uuid4().hex * 2


@pytest.mark.parametrize(
    ("authorization", "status", "title"),
    [
        (lambda t: f"Basic {t[:20]}\x01{t[20:]}", 400, "Bad request"),
        (lambda t: "Basic " + t * 300, 431, "Headers too large"),  # about 20 KB
    ],
    ids=["control-character", "20-kb"],
)
async def test_a_header_the_parser_rejects_gets_an_info_reply_and_never_shows_the_token(
    settings: Settings,
    redis: Redis,
    amqp_cleanup: None,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    authorization: Callable[[str], str],
    status: int,
    title: str,
) -> None:
    caplog.set_level(logging.DEBUG)  # every level of every logger, aiohttp.server's too
    token = unreadable_token()
    async with served(settings) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write((CLOSE_HEAD + f"Authorization: {authorization(token)}\r\n\r\n").encode())
        _, reply = await seconds_until_closed(reader)  # the reply, then the connection closes
        writer.close()
    head, _, payload = reply.partition(b"\r\n\r\n")
    # aiohttp answers what it could not parse as HTTP/1.0
    assert head.split(b" ")[1] == str(status).encode(), head
    assert b"content-type: application/json" in head.lower()
    info = json.loads(payload)["info"]
    assert InfoReplySchema().validate({"info": info}) == {}
    assert (info["type"], info["title"], info["sessionId"]) == ("error", title, "")
    shown = reply.decode(errors="replace") + caplog.text + "".join(capfd.readouterr())
    # the token's first 16 characters: aiohttp's own messages cut what they quote
    assert token[:16] not in shown
    assert any(r.getMessage() == "request rejected by the HTTP parser" for r in caplog.records)
