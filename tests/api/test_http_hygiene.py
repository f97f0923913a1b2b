"""HTTP hygiene: stalled and vanishing clients, requests aiohttp's parser rejects."""

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
from aiohttp import web
from redis.asyncio import Redis

from service.app import create_app
from service.appkeys import AMQP, METRICS
from service.schemas import InfoReplySchema
from service.server import listening
from session_close.keys import Keys
from session_close.settings import Settings
from tests.conftest import through
from tests.support.closing import (
    BODY,
    CLOSE_PATH,
    SID,
    TOKEN,
    USER,
    open_session,
)
from tests.support.proxy import TcpProxy
from tests.support.waiting import wait_until

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
    """How long until the server closes the connection, and what it sent before; a
    connection still open after WITHIN seconds fails the test's assertion."""
    begun = time.monotonic()
    try:
        received = await asyncio.wait_for(reader.read(), WITHIN)
    except TimeoutError:
        raise AssertionError(f"the server did not close the connection in {WITHIN}s") from None
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
