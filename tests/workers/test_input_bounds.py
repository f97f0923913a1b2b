"""The workers read no more than the API writes: an event id that is not a canonical UUID,
or a data field longer than the API's own bound for it, is malformed, dead-lettered at
its first delivery with a log line and never retried, and the good events around it are
applied. The audit worker, whose PostgreSQL would otherwise store such a value or fail on
it until it poisons."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from session_close.events import APP_VERSION_MAX, OS_MAX, REQUEST_ID_MAX, SESSION_ID_MAX
from session_close.settings import Settings
from tests.support.waiting import wait_until
from tests.support.workers import (
    AuditTable,
    Broker,
    dead_letter_count,
    in_process,
    make_event,
    retry_count,
    running,
)
from workers.audit import open_audit


def out_of_bounds(settings: Settings) -> dict[str, dict[str, Any]]:
    """By message id: a good event with one value past what the API would write."""

    def event(**data: Any) -> dict[str, Any]:
        good = make_event().to_cloudevent(settings.event_source)
        return {**good, "data": {**good["data"], **data}}

    def with_id(event_id: str) -> dict[str, Any]:
        return {**event(), "id": event_id}

    same = str(uuid.uuid4())
    return {
        "id-in-braces": with_id("{" + same + "}"),
        "id-urn": with_id("urn:uuid:" + same),
        "id-upper-case": with_id(same.upper()),
        "id-without-dashes": with_id(same.replace("-", "")),
        "id-with-a-newline": with_id(same + "\n"),
        "request-id-too-long": event(requestId="r" * (REQUEST_ID_MAX + 1)),
        "request-id-of-a-megabyte": event(requestId="r" * 1_000_000),
        "os-too-long": event(os="o" * (OS_MAX + 1)),
        "os-of-100-kb": event(os="o" * 100_000),
        "app-version-too-long": event(appVersion="1.0.0-" + "a" * APP_VERSION_MAX),
        "session-id-too-long": event(sessionId="s" * (SESSION_ID_MAX + 1)),
    }


async def test_an_event_past_the_apis_bounds_is_dead_lettered_at_its_first_delivery(
    settings: Settings,
    broker: Broker,
    audit_table: AuditTable,
    caplog: pytest.LogCaptureFixture,
    report_counts: Callable[..., None],
) -> None:
    bad = out_of_bounds(settings)
    good = [make_event(n) for n in range(len(bad) + 1)]
    at_the_bounds = make_event(99)
    at_the_bounds_body = at_the_bounds.to_cloudevent(settings.event_source)
    at_the_bounds_body["data"].update(
        requestId="r" * REQUEST_ID_MAX, os="o" * OS_MAX, appVersion="1" * APP_VERSION_MAX
    )
    dlq = broker.topology.dead_letter_queue("audit")
    worker = in_process(settings, "audit", open_audit)
    async with running(worker):
        with caplog.at_level(logging.ERROR, logger="workers.runner"):
            await broker.publish_in_order(good[0])
            for (message_id, body), event in zip(bad.items(), good[1:], strict=True):
                await broker.publish_raw(json.dumps(body).encode(), message_id)
                await broker.publish_in_order(event)
            await broker.publish_raw(
                json.dumps(at_the_bounds_body).encode(), at_the_bounds.event_id
            )

            async def settled() -> bool:
                return (await broker.depth(dlq))[0] == len(bad) and await audit_table.count() == (
                    len(good) + 1
                )

            await wait_until(settled, f"{len(bad)} in the DLQ, the others audited", within=30)
    assert retry_count(worker.metrics) == 0, "a malformed message is never retried"
    assert dead_letter_count(worker.metrics, "malformed") == len(bad)
    assert dead_letter_count(worker.metrics, "poison") == 0
    assert set(await audit_table.event_ids()) == {e.event_id for e in [*good, at_the_bounds]}
    lines = {
        str(r.__dict__["message_id"]): r.__dict__
        for r in caplog.records
        if r.getMessage() == "worker dead-lettered a message"
    }
    assert set(lines) == set(bad)
    assert {line["dead_letter"] for line in lines.values()} == {"malformed"}
    assert "id" in lines["id-urn"]["reason"]
    assert "requestId" in lines["request-id-of-a-megabyte"]["reason"]
    report_counts(
        malformed=len(bad),
        dead_lettered=len(lines),
        audited=await audit_table.count(),
        retries=retry_count(worker.metrics),
    )
