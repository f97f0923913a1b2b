"""Poison and malformed messages against the real RabbitMQ, PostgreSQL and Redis: a
message that fails for its content is dead-lettered (at once when no consumer could
store it, after WORKER_MAX_ATTEMPTS when its backend rejects it), with a log line saying
why, and never holds back the good messages that shared its batch."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
from redis.asyncio import Redis

from session_close.keys import Keys
from session_close.settings import Settings
from tests.support.waiting import wait_until
from tests.support.workers import (
    REJECTED_USER,
    AuditTable,
    Broker,
    dead_letter_count,
    in_process,
    logged_lines,
    make_event,
    retry_count,
    running,
    settled_count,
    table_rejecting,
)
from workers.audit import open_audit
from workers.push_cleanup import open_push_cleanup
from workers.runner import Worker

MAX_ATTEMPTS = 3


def dead_letter_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == "worker dead-lettered a message"]


async def settled(worker: Worker, broker: Broker, *, acked: int, dead: int) -> None:
    dlq = broker.topology.dead_letter_queue(worker.name)

    async def done() -> bool:
        return (
            settled_count(worker.metrics, "acked") + settled_count(worker.metrics, "retried")
            == acked
            and (await broker.depth(dlq))[0] == dead
        )

    await wait_until(done, f"{acked} acked and {dead} dead-lettered", within=30)


async def test_a_row_the_database_rejects_is_dead_lettered_after_its_attempts_and_its_batch_lands(
    settings: Settings,
    broker: Broker,
    audit_table: AuditTable,
    caplog: pytest.LogCaptureFixture,
    report_counts: Callable[..., None],
) -> None:
    await table_rejecting(settings)
    good = [make_event(n) for n in range(40)]
    poison = make_event(user_id=REJECTED_USER)
    worker = in_process(settings, "audit", open_audit, worker_max_attempts=MAX_ATTEMPTS)
    caplog.set_level(logging.INFO, logger="workers")
    async with running(worker):
        # One burst: the poison shares its first INSERT with good events.
        await broker.publish(*good[:20], poison, *good[20:])
        await settled(worker, broker, acked=len(good), dead=1)
    rows = await audit_table.count()
    report_counts(
        sent=len(good) + 1,
        rows=rows,
        retries=retry_count(worker.metrics),
        dead_lettered=settled_count(worker.metrics, "dead_lettered"),
    )
    assert rows == len(good)
    assert set(await audit_table.event_ids()) == {e.event_id for e in good}
    # Only the poison paid: each of its failed attempts but the last was retried.
    assert retry_count(worker.metrics) == MAX_ATTEMPTS - 1
    assert settled_count(worker.metrics, "dead_lettered") == 1
    assert dead_letter_count(worker.metrics, "poison") == 1
    [line] = dead_letter_lines(caplog)
    assert line.__dict__["message_id"] == poison.event_id
    assert line.__dict__["dead_letter"] == "poison"
    assert f"failed {MAX_ATTEMPTS} attempts" in line.__dict__["reason"]
    assert "CheckViolationError" in line.__dict__["reason"]
    assert any(line["duplicate"] is False for line in logged_lines(caplog.records))


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("closed_at", "0001-01-01T00:00:00+01:00", "Outside the range"),
        ("user_id", "user\x00with-nul", "NUL"),
    ],
)
async def test_a_value_no_consumer_can_store_is_dead_lettered_at_first_delivery(
    settings: Settings,
    broker: Broker,
    audit_table: AuditTable,
    caplog: pytest.LogCaptureFixture,
    field: str,
    value: str,
    why: str,
) -> None:
    good = [make_event(n) for n in range(10)]
    bad = make_event(closed_at=value) if field == "closed_at" else make_event(user_id=value)
    worker = in_process(settings, "audit", open_audit, worker_max_attempts=MAX_ATTEMPTS)
    caplog.set_level(logging.INFO, logger="workers")
    async with running(worker):
        await broker.publish(*good[:5], bad, *good[5:])
        await settled(worker, broker, acked=len(good), dead=1)
    assert set(await audit_table.event_ids()) == {e.event_id for e in good}
    assert retry_count(worker.metrics) == 0, "malformed: no retry"
    assert dead_letter_count(worker.metrics, "malformed") == 1
    [line] = dead_letter_lines(caplog)
    assert line.__dict__["message_id"] == bad.event_id
    assert line.__dict__["dead_letter"] == "malformed"
    assert why in line.__dict__["reason"]


async def test_a_push_key_of_the_wrong_type_is_dead_lettered_after_its_attempts_and_others_cleaned(
    settings: Settings,
    broker: Broker,
    redis: Redis,
    keys: Keys,
    caplog: pytest.LogCaptureFixture,
) -> None:
    users = [f"user-{n}" for n in range(10)]
    for user in users:
        await redis.hset(keys.user_push(user), mapping={f"tok-{user}": f"s-{user}", "kept": "s-x"})
    await redis.set(keys.user_push("wrong-type"), "not a hash")
    events = [make_event(session_id=f"s-{user}", user_id=user) for user in users]
    poison = make_event(session_id="s-wrong-type", user_id="wrong-type")
    worker = in_process(
        settings, "push-cleanup", open_push_cleanup, worker_max_attempts=MAX_ATTEMPTS
    )
    caplog.set_level(logging.INFO, logger="workers")
    async with running(worker):
        await broker.publish(*events[:5], poison, *events[5:])
        await settled(worker, broker, acked=len(events), dead=1)
    for user in users:
        assert await redis.hgetall(keys.user_push(user)) == {"kept": "s-x"}
    assert await redis.get(keys.user_push("wrong-type")) == "not a hash"
    assert retry_count(worker.metrics) == MAX_ATTEMPTS - 1
    assert dead_letter_count(worker.metrics, "poison") == 1
    [line] = dead_letter_lines(caplog)
    assert line.__dict__["message_id"] == poison.event_id
    assert "WRONGTYPE" in line.__dict__["reason"]
