"""The workers as tolerant readers of CloudEvents from another producer: events built and
encoded by the official CloudEvents SDK, with extension attributes (traceparent,
dataschema, anything else), extra fields in data and no subject, are applied; each
worker log line of a traced event carries its trace id."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

from cloudevents.core.bindings.rabbitmq import to_structured
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from session_close.settings import Settings
from tests.support.waiting import wait_until
from tests.support.workers import (
    REJECTED_USER,
    AuditTable,
    Broker,
    WorkerProcess,
    table_rejecting,
)


def traceparent() -> tuple[str, str]:
    trace_id = uuid.uuid4().hex
    return f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01", trace_id


def sdk_event(n: int, user_id: str = "u1", **extensions: Any) -> CloudEvent:
    """A session.closed event as another team's producer would build it with the SDK:
    no subject, extension attributes, and a data field this service does not know."""
    return CloudEvent(
        {
            "type": "session.closed",
            "source": "/another/producer",
            "datacontenttype": "application/json",
            "dataschema": "https://example.com/schemas/session-closed.json",
            "partitionkey": user_id,
            **extensions,
        },
        {
            "sessionId": f"sdk-session-{n}",
            "userId": user_id,
            "closedAt": "2026-03-04T05:06:07+02:00",
            "reason": "user_logout",
            "os": "iOS",
            "appVersion": "3.0.0",
            "requestId": f"sdk-req-{n}",
            "deviceModel": "a field added by a later version",
        },
    )


async def publish_sdk(broker: Broker, event: CloudEvent) -> None:
    message = to_structured(event, JSONFormat())
    assert message.content_type is not None
    await broker.publish_raw(message.body, event.get_id(), content_type=message.content_type)


async def test_events_from_the_cloudevents_sdk_are_applied_and_logged_with_their_trace_id(
    settings: Settings,
    broker: Broker,
    audit_table: AuditTable,
    worker_processes: list[WorkerProcess],
) -> None:
    await table_rejecting(settings)
    traced = {}
    for n in range(5):
        header, trace_id = traceparent()
        traced[trace_id] = sdk_event(n, traceparent=header)
    untraced = sdk_event(10)
    badly_traced = sdk_event(11, traceparent="00-not-a-trace-context")
    header, poison_trace = traceparent()
    poison = sdk_event(12, user_id=REJECTED_USER, traceparent=header)
    worker = await WorkerProcess.start(
        dataclasses.replace(settings, worker_max_attempts=2), "audit"
    )
    worker_processes.append(worker)
    await worker.wait_logged("consuming")
    for event in [*traced.values(), untraced, badly_traced, poison]:
        await publish_sdk(broker, event)

    applied = [*traced.values(), untraced, badly_traced]

    async def all_rows() -> bool:
        return await audit_table.count() == len(applied)

    await wait_until(all_rows, "a row per SDK event", within=30)
    await worker.wait_logged("dead-lettered", timeout=30)

    row = await audit_table.row(untraced.get_id())
    assert (row["session_id"], row["user_id"], row["os"]) == ("sdk-session-10", "u1", "iOS")
    audited = {line["event_id"]: line for line in worker.logged("session close audited")}
    assert set(audited) == {e.get_id() for e in applied}
    for trace_id, event in traced.items():
        assert audited[event.get_id()]["trace_id"] == trace_id
    for event in (untraced, badly_traced):  # a malformed traceparent is ignored
        assert audited[event.get_id()].get("trace_id") is None
    # Every line about the poison, its retries and its dead-letter, carries its trace.
    about_poison = [line for line in worker.lines if line.get("event_id") == poison.get_id()]
    assert {line["event"] for line in about_poison} >= {
        "worker could not apply event; retrying",
        "worker dead-lettered a message",
    }
    assert all(line["trace_id"] == poison_trace for line in about_poison)
    assert (await broker.depth(broker.topology.dead_letter_queue("audit")))[0] == 1
