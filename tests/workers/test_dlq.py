"""Malformed messages go to the dead-letter queue at once, with a log line saying why;
replay-dlq moves dead-lettered messages back and the good ones get processed."""

from __future__ import annotations

import json
import logging

import pytest

from session_close.settings import Settings
from tests.support.waiting import wait_until
from tests.support.workers import (
    AuditTable,
    Broker,
    in_process,
    make_event,
    retry_count,
    running,
    settled_count,
)
from workers.audit import open_audit
from workers.replay import replay_dead_letters


def malformed_bodies(settings: Settings) -> dict[str, bytes]:
    good = make_event().to_cloudevent(settings.event_source)
    wrong_type = {**good, "type": "session.opened"}
    missing_user = {**good, "data": {k: v for k, v in good["data"].items() if k != "userId"}}
    return {
        "bad-json": b"{not json",
        "bad-type": json.dumps(wrong_type).encode(),
        "no-user": json.dumps(missing_user).encode(),
    }


async def test_malformed_messages_are_dead_lettered_at_once_and_replay_brings_good_ones_back(
    settings: Settings,
    broker: Broker,
    audit_table: AuditTable,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dlq = broker.topology.dead_letter_queue("audit")
    good = [make_event(n) for n in range(2)]
    worker = in_process(settings, "audit", open_audit)
    async with running(worker):
        with caplog.at_level(logging.ERROR, logger="workers.runner"):
            for message_id, body in malformed_bodies(settings).items():
                await broker.publish_raw(body, message_id)
            await broker.publish(*good)

            async def malformed_in_dlq() -> bool:
                return (await broker.depth(dlq))[0] == 3

            await wait_until(malformed_in_dlq, "3 messages in the DLQ", within=5)
        assert retry_count(worker.metrics) == 0, "a malformed message must not be retried"
        assert settled_count(worker.metrics, "dead_lettered") == 3
        reasons = {
            str(r.__dict__.get("message_id")): str(r.__dict__.get("reason")) for r in caplog.records
        }
        assert reasons["bad-json"].startswith("not JSON")
        assert "type" in reasons["bad-type"]
        assert "userId" in reasons["no-user"]
        await wait_until(lambda: _has_rows(audit_table, 2), "the good events' rows")

    # Good events that an earlier worker dead-lettered (say, a bug since fixed).
    stranded = [make_event(10 + n) for n in range(2)]
    for event in stranded:
        await broker.publish_raw(
            event.encode(settings.event_source), event.event_id, to_dead_letters="audit"
        )
    work = broker.topology.queue("audit")
    assert (await broker.depth(dlq))[0] == 5
    assert await replay_dead_letters(settings, "audit", limit=1) == 1
    assert [(await broker.depth(q))[0] for q in (dlq, work)] == [4, 1]
    assert await replay_dead_letters(settings, "audit") == 4
    assert [(await broker.depth(q))[0] for q in (dlq, work)] == [0, 5]

    worker = in_process(settings, "audit", open_audit)
    async with running(worker):
        await wait_until(lambda: _has_rows(audit_table, 4), "the replayed events' rows")

        async def malformed_back_in_dlq() -> bool:
            return (await broker.depth(dlq))[0] == 3 and settled_count(
                worker.metrics, "dead_lettered"
            ) == 3

        await wait_until(malformed_back_in_dlq, "the malformed ones dead-lettered again")
    assert set(await audit_table.event_ids()) == {e.event_id for e in good + stranded}

    # Replay kept body and properties: the same ids, headers and bodies are back in the DLQ.
    channel = await broker.channel()
    queue = await channel.declare_queue(dlq, passive=True)
    seen = {}
    for _ in range(3):
        message = await queue.get(no_ack=True, timeout=5)
        seen[message.message_id] = (message.body, (message.headers or {}).get("x-test"))
    bodies = malformed_bodies(settings)
    assert seen["bad-json"] == (bodies["bad-json"], "kept")
    assert set(seen) == set(bodies)


async def _has_rows(table: AuditTable, n: int) -> bool:
    return await table.count() == n
