"""The session.closed event on RabbitMQ, exactly as docs/events.md describes it, and
no access or push token in any event or log line."""

from __future__ import annotations

import dataclasses
import json
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from aiohttp.pytest_plugin import AiohttpClient
from redis.asyncio import Redis

from service.app import create_app
from service.appkeys import AMQP
from session_close.keys import Keys, token_digest
from session_close.settings import Settings
from tests.support.closing import BODY, CLOSE_PATH, Client, app_headers, open_session
from tests.support.events import collecting
from tests.support.waiting import wait_until

USER, SID = "user-42", "session-0001"
TOKEN = "secret-access-token-0123456789"
PUSH_TOKEN = "fcm:secret-push-token-abcdefgh"


@pytest.fixture
async def audit_messages(settings: Settings) -> AsyncIterator[list[AbstractIncomingMessage]]:
    """Messages arriving on the test's audit queue, collected as they come."""
    async with collecting(settings, "audit") as received:
        yield received


async def one_event(received: list[AbstractIncomingMessage]) -> AbstractIncomingMessage:
    async def arrived() -> bool:
        return bool(received)

    await wait_until(arrived, "the session.closed message", within=10)
    assert len(received) == 1
    return received[0]


def rfc3339(value: str) -> datetime:
    assert value.endswith("Z") or value[-6] in "+-", value
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    assert parsed.tzinfo is not None
    return parsed


async def test_the_event_is_a_persistent_structured_cloudevent(
    client: Client,
    redis: Redis,
    keys: Keys,
    settings: Settings,
    audit_messages: list[AbstractIncomingMessage],
) -> None:
    await open_session(redis, keys, USER, SID, TOKEN, push_token=PUSH_TOKEN)
    headers = app_headers(TOKEN, SID, OS="Android", AppVersion="2.0.0-rc.1+build.5")
    headers["X-Request-ID"] = "req-0001"
    before = datetime.now(UTC)
    resp = await client.post(CLOSE_PATH, headers=headers, data=BODY)
    assert resp.status == 200

    message = await one_event(audit_messages)
    assert message.content_type == "application/cloudevents+json"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.routing_key == "session.closed"
    assert message.exchange == settings.amqp_exchange
    event = json.loads(message.body)
    assert message.message_id == event["id"]
    assert str(uuid.UUID(event["id"])) == event["id"]
    closed_at = rfc3339(event["time"])
    assert before - timedelta(seconds=1) <= closed_at <= datetime.now(UTC) + timedelta(seconds=1)
    assert event == {
        "specversion": "1.0",
        "id": event["id"],
        "source": "/eliab/session-service",
        "type": "session.closed",
        "time": event["time"],
        "subject": SID,
        "datacontenttype": "application/json",
        "data": {
            "sessionId": SID,
            "userId": USER,
            "closedAt": event["time"],
            "reason": "user_logout",
            "os": "Android",
            "appVersion": "2.0.0-rc.1+build.5",
            "requestId": "req-0001",
        },
    }


async def test_the_event_takes_os_and_app_version_from_the_session_when_not_sent(
    client: Client,
    redis: Redis,
    keys: Keys,
    audit_messages: list[AbstractIncomingMessage],
) -> None:
    await open_session(redis, keys, USER, SID, TOKEN, os="iOS", app_version="3.1.4")
    headers = app_headers(TOKEN, SID)
    del headers["OS"], headers["AppVersion"]
    resp = await client.post(CLOSE_PATH, headers=headers, data=BODY)
    request_id = resp.headers["X-Request-ID"]
    data = json.loads((await one_event(audit_messages)).body)["data"]
    assert (data["os"], data["appVersion"], data["requestId"]) == ("iOS", "3.1.4", request_id)


async def test_the_event_has_null_os_and_app_version_when_nobody_knows_them(
    client: Client,
    redis: Redis,
    keys: Keys,
    audit_messages: list[AbstractIncomingMessage],
) -> None:
    await open_session(redis, keys, USER, SID, TOKEN)
    headers = app_headers(TOKEN, SID)
    del headers["OS"], headers["AppVersion"]
    await client.post(CLOSE_PATH, headers=headers, data=BODY)
    data = json.loads((await one_event(audit_messages)).body)["data"]
    assert (data["os"], data["appVersion"]) == (None, None)


async def test_the_event_source_is_configurable(
    settings: Settings,
    redis: Redis,
    keys: Keys,
    amqp_cleanup: None,
    audit_messages: list[AbstractIncomingMessage],
    aiohttp_client: AiohttpClient,
) -> None:
    custom = dataclasses.replace(settings, event_source="/test/elsewhere")
    test_client = await aiohttp_client(create_app(custom))
    await open_session(redis, keys, USER, SID, TOKEN)
    await test_client.post(CLOSE_PATH, headers=app_headers(TOKEN, SID), data=BODY)
    assert json.loads((await one_event(audit_messages)).body)["source"] == "/test/elsewhere"
    assert test_client.app[AMQP].done()


def leaks(text: str) -> list[str]:
    secrets = (TOKEN, PUSH_TOKEN, token_digest(TOKEN), "A" * 40)
    return [s for s in secrets if s in text]


async def test_no_token_in_events_or_logs(
    client: Client,
    redis: Redis,
    keys: Keys,
    audit_messages: list[AbstractIncomingMessage],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    await open_session(redis, keys, USER, SID, TOKEN, push_token=PUSH_TOKEN)
    attempts: list[dict[str, str]] = [
        app_headers(TOKEN, SID, Authorization=f"Bearer {'A' * 40}"),  # unknown token: 401
        app_headers(TOKEN, SID, Authorization=f"Token {TOKEN}"),  # malformed: 401
        app_headers(TOKEN, SID, AppVersion="v1"),  # 400
        app_headers(TOKEN, SID),  # success
        app_headers(TOKEN, SID),  # case 8
    ]
    for headers in attempts:
        await client.post(CLOSE_PATH, headers=headers, data=BODY)
    await client.post("/nowhere", headers=app_headers(TOKEN, SID), data=BODY)
    await redis.set(keys.token("B" * 40), USER)  # a wrong-type key: the 500 path logs
    await client.post(CLOSE_PATH, headers=app_headers("B" * 40, SID), data=BODY)

    message = await one_event(audit_messages)
    assert leaks(message.body.decode()) == []
    assert leaks(json.dumps(message.headers) + str(message.info())) == []
    assert caplog.records, "the close path logs nothing at DEBUG?"
    for record in caplog.records:
        rendered = f"{record.getMessage()} {record.exc_text or ''} {_extra(record)}"
        assert leaks(rendered) == [], rendered
        assert "B" * 40 not in rendered


def _extra(record: logging.LogRecord) -> str:
    standard = logging.makeLogRecord({}).__dict__.keys()
    return json.dumps({k: v for k, v in record.__dict__.items() if k not in standard}, default=str)


async def test_the_event_body_round_trips_through_the_workers_decoder(
    client: Client,
    redis: Redis,
    keys: Keys,
    audit_messages: list[AbstractIncomingMessage],
) -> None:
    from session_close.events import SessionEvent

    await open_session(redis, keys, USER, SID, TOKEN)
    await client.post(CLOSE_PATH, headers=app_headers(TOKEN, SID), data=BODY)
    message = await one_event(audit_messages)
    event: Any = SessionEvent.decode(message.body)
    assert (event.session_id, event.user_id, event.event_id) == (SID, USER, message.message_id)


TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _event(**changes: Any) -> dict[str, Any]:
    from session_close.events import SessionEvent

    event = SessionEvent(
        event_id=str(uuid.uuid4()),
        session_id=SID,
        user_id=USER,
        closed_at="2026-01-02T03:04:05+00:00",
        os="Android",
        app_version=None,
        request_id="req-1",
    ).to_cloudevent("/elsewhere")
    event.update(changes)
    return event


def test_a_consumer_reads_past_extensions_extra_data_and_missing_optional_attributes() -> None:
    from session_close.events import SessionEvent

    raw = _event(dataschema="https://example.com/s.json", somethingelse={"a": 1})
    del raw["subject"], raw["time"]
    raw["data"] = {k: v for k, v in raw["data"].items() if k not in ("os", "requestId")}
    raw["data"]["addedLater"] = "ignored"
    event = SessionEvent.decode(json.dumps(raw).encode())
    assert (event.session_id, event.user_id, event.os, event.request_id) == (SID, USER, None, None)


@pytest.mark.parametrize(
    ("value", "trace_id"),
    [
        (TRACEPARENT, "4bf92f3577b34da6a3ce929d0e0e4736"),
        (
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future",
            "4bf92f3577b34da6a3ce929d0e0e4736",
        ),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra", None),
        ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None),
        ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", None),
        ("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", None),
        ("garbage", None),
        (42, None),
    ],
)
def test_the_trace_id_is_read_from_a_valid_traceparent_and_a_malformed_one_is_ignored(
    value: object, trace_id: str | None
) -> None:
    from session_close.events import SessionEvent

    event = SessionEvent.decode(json.dumps(_event(traceparent=value)).encode())
    assert event.trace_id == trace_id


@pytest.mark.parametrize(
    "data",
    [
        {"userId": "user\x00nul"},
        {"sessionId": "session\x00nul"},
        {"os": "And\x00roid"},
        {"closedAt": "0001-01-01T00:00:00+01:00"},
        {"closedAt": "9999-12-31T23:59:59-01:00"},
    ],
)
def test_a_value_no_consumer_can_store_makes_the_event_malformed(data: dict[str, str]) -> None:
    from session_close.events import MalformedEvent, SessionEvent

    raw = _event()
    raw["data"].update(data)
    with pytest.raises(MalformedEvent, match=next(iter(data))):
        SessionEvent.decode(json.dumps(raw).encode())
