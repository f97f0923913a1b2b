"""The W3C traceparent of a close, end to end: the request's header becomes the event's
CloudEvents extension attribute `traceparent`, and the worker's log line for that event
carries its trace id; a malformed header is ignored and the close still succeeds."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

import pytest
from aio_pika.abc import AbstractIncomingMessage
from redis.asyncio import Redis

from session_close.keys import Keys
from session_close.settings import Settings
from tests.support.closing import BODY, CLOSE_PATH, Client, app_headers, open_session
from tests.support.events import collecting
from tests.support.waiting import wait_until
from tests.support.workers import AuditTable, in_process, logged_lines, running
from workers.audit import open_audit

USER, TOKEN = "user-traced", "token-of-the-traced-user"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.fixture
async def published(settings: Settings) -> AsyncIterator[list[AbstractIncomingMessage]]:
    """The events as published, seen on the push-cleanup queue (no push worker runs
    here; the audit worker has the audit queue)."""
    async with collecting(settings, "push-cleanup") as received:
        yield received


async def close_and_audit(
    client: Client,
    settings: Settings,
    published: list[AbstractIncomingMessage],
    caplog: pytest.LogCaptureFixture,
    sid: str,
    traceparent: str,
) -> tuple[dict[str, object], dict[str, object]]:
    """Close `sid` sending `traceparent`; the published event and the audit worker's
    'audited' log line for it."""
    worker = in_process(settings, "audit", open_audit)
    async with running(worker):
        resp = await client.post(
            CLOSE_PATH, headers=app_headers(TOKEN, sid, traceparent=traceparent), data=BODY
        )
        assert resp.status == 200, await resp.text()
        await wait_until(lambda: len(published) == 1, "the published event", within=10)

        def audited() -> list[dict[str, object]]:
            records = [r for r in caplog.records if r.msg == "session close audited"]
            return logged_lines(records)

        await wait_until(lambda: len(audited()) == 1, "the audit worker's line", within=15)
    event = json.loads(published[0].body)
    [line] = audited()
    assert line["event_id"] == event["id"]
    return event, line


async def test_a_close_requests_traceparent_reaches_the_event_and_the_workers_log_line(
    client: Client,
    settings: Settings,
    redis: Redis,
    keys: Keys,
    audit_table: AuditTable,
    published: list[AbstractIncomingMessage],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    await open_session(redis, keys, USER, "session-traced", TOKEN)
    event, line = await close_and_audit(
        client, settings, published, caplog, "session-traced", TRACEPARENT
    )
    assert event.get("traceparent") == TRACEPARENT
    assert line["trace_id"] == TRACE_ID


async def test_a_malformed_traceparent_is_ignored_and_the_close_succeeds(
    client: Client,
    settings: Settings,
    redis: Redis,
    keys: Keys,
    audit_table: AuditTable,
    published: list[AbstractIncomingMessage],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    await open_session(redis, keys, USER, "session-badly-traced", TOKEN)
    malformed = f"00-{TRACE_ID.upper()}-00f067aa0ba902b7-01"  # upper-case hex: not W3C
    event, line = await close_and_audit(
        client, settings, published, caplog, "session-badly-traced", malformed
    )
    assert "traceparent" not in event
    assert line.get("trace_id") is None
    assert await audit_table.count() == 1
