"""The audit worker against the real RabbitMQ and PostgreSQL: one row per event, whatever
is redelivered, killed, scaled out or cut off."""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from session_close.settings import Settings
from tests.conftest import through
from tests.support.proxy import TcpProxy
from tests.support.waiting import wait_until
from tests.support.workers import (
    AuditTable,
    Broker,
    WorkerProcess,
    in_process,
    logged_lines,
    make_event,
    retry_count,
    running,
    settled_count,
)
from workers.audit import open_audit


def rows_reach(table: AuditTable, n: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await table.count() >= n

    return check


async def test_each_event_gets_one_row_and_a_redelivery_adds_nothing(
    settings: Settings, broker: Broker, audit_table: AuditTable
) -> None:
    events = [make_event(n) for n in range(20)]
    worker = in_process(settings, "audit", open_audit)
    async with running(worker):
        await broker.publish(*events)
        await broker.publish(events[0], events[1])  # the relay re-published these two

        async def all_settled() -> bool:
            return settled_count(worker.metrics, "acked") >= 22

        await wait_until(all_settled, "22 messages acked")
    assert await audit_table.count() == 20
    assert sorted(await audit_table.event_ids()) == sorted(e.event_id for e in events)
    row = await audit_table.row(events[3].event_id)
    assert row["session_id"] == events[3].session_id
    assert row["user_id"] == "u1"
    assert row["closed_at"] == datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
    assert row["reason"] == "user_logout"
    assert (row["os"], row["app_version"]) == ("Android", "1.0.10")
    assert row["request_id"] == events[3].request_id
    assert row["recorded_at"] is not None


async def test_a_close_time_with_any_offset_is_stored_as_the_same_instant(
    settings: Settings, broker: Broker, audit_table: AuditTable
) -> None:
    times = [
        "2026-01-02T03:04:05.123456+05:30",
        "2026-01-02T03:04:05-03:00",
        "2026-01-02T03:04:05Z",
    ]
    events = [make_event(n, closed_at=t) for n, t in enumerate(times)]
    worker = in_process(settings, "audit", open_audit)
    async with running(worker):
        await broker.publish(*events)
        await wait_until(rows_reach(audit_table, len(events)), "a row per event")
    for event, closed_at in zip(events, times, strict=True):
        row = await audit_table.row(event.event_id)
        assert row["closed_at"] == datetime.fromisoformat(closed_at)


@pytest.mark.fault
async def test_a_worker_killed_mid_batch_leaves_exactly_one_row_per_event_after_redelivery(
    settings: Settings,
    broker: Broker,
    audit_table: AuditTable,
    worker_processes: list[WorkerProcess],
    caplog: pytest.LogCaptureFixture,
    report_counts: Callable[..., None],
) -> None:
    events = [make_event(n) for n in range(600)]
    await broker.publish(*events)
    doomed = await WorkerProcess.start(settings, "audit", "--prefetch", "50", "--concurrency", "20")
    worker_processes.append(doomed)
    await wait_until(rows_reach(audit_table, 40), "the first rows", within=20)
    doomed.signal(signal.SIGKILL)
    await doomed.wait(5)
    written = set(await audit_table.event_ids())
    assert len(written) < len(events), "the worker finished before the kill; nothing was tested"
    # Rows already written come back as deliveries, as they would when a worker dies
    # between its commit and its acks: the relay re-published them, same ids.
    again = [e for e in events if e.event_id in written]
    await broker.publish(*again)

    successor = in_process(settings, "audit", open_audit)
    caplog.set_level(logging.INFO, logger="workers.audit")

    def already_audited() -> list[dict[str, Any]]:
        return [line for line in logged_lines(caplog.records) if line["duplicate"] is True]

    async with running(successor):
        await wait_until(rows_reach(audit_table, len(events)), "every row", within=30)

        async def drained() -> bool:
            # At least each event without a row and each republished one delivered and
            # acked (those the killed worker wrote but had not acked come back too).
            ready, _ = await broker.depth(broker.topology.queue("audit"))
            acked = settled_count(successor.metrics, "acked")
            return ready == 0 and acked >= len(events) - len(written) + len(again)

        await wait_until(drained, "the queue drained")
        ids = await audit_table.event_ids()
        assert len(ids) == len(set(ids)) == len(events)

        async def each_duplicate_logged_and_acked() -> bool:
            # A delivery is logged, then acked: wait for the last lines and their acks.
            duplicates = len(already_audited())
            acked = settled_count(successor.metrics, "acked")
            return duplicates >= len(again) and acked == len(events) - len(written) + duplicates

        await wait_until(each_duplicate_logged_and_acked, "every duplicate logged and acked")
    delivered = settled_count(successor.metrics, "acked")
    already = already_audited()
    report_counts(
        sent=len(events),
        rows_at_kill=len(written),
        republished=len(again),
        delivered_to_successor=delivered,
        already_audited=len(already),
        rows=len(ids),
        dead_lettered=settled_count(successor.metrics, "dead_lettered"),
    )
    assert set(ids) == {e.event_id for e in events}
    # Every delivery of an event that already had its row was counted as a duplicate,
    # not written: deliveries = new rows + "already audited" lines.
    assert delivered == len(events) - len(written) + len(already)
    assert len(already) >= len(again)
    assert {line["event_id"] for line in already} >= {e.event_id for e in again}
    assert settled_count(successor.metrics, "dead_lettered") == 0


async def test_two_audit_workers_split_the_load_and_write_each_event_once(
    settings: Settings, broker: Broker, audit_table: AuditTable
) -> None:
    events = [make_event(n) for n in range(300)]
    # A small prefetch so that neither worker can take the whole burst at once.
    first = in_process(settings, "audit", open_audit, worker_prefetch=5, worker_concurrency=5)
    second = in_process(settings, "audit", open_audit, worker_prefetch=5, worker_concurrency=5)
    async with running(first), running(second):
        await broker.publish(*events)
        await wait_until(rows_reach(audit_table, len(events)), "every row", within=30)

        async def all_acked() -> bool:
            total = settled_count(first.metrics, "acked") + settled_count(second.metrics, "acked")
            return total >= len(events)

        await wait_until(all_acked, "every message acked")
    assert settled_count(first.metrics, "acked") > 0
    assert settled_count(second.metrics, "acked") > 0
    assert settled_count(first.metrics, "acked") + settled_count(second.metrics, "acked") == len(
        events
    )
    ids = await audit_table.event_ids()
    assert sorted(ids) == sorted(e.event_id for e in events)


@pytest.mark.fault
async def test_postgres_cut_dead_letters_nothing_and_every_row_lands_after_restore(
    settings: Settings,
    broker: Broker,
    audit_table: AuditTable,
    postgres_proxy: TcpProxy,
    report_counts: Callable[..., None],
) -> None:
    # Far fewer attempts than the retries below: an outage must never count against them.
    worker = in_process(
        settings,
        "audit",
        open_audit,
        database_url=through(settings.database_url, postgres_proxy),
        worker_max_attempts=2,
    )
    events = [make_event(n) for n in range(30)]
    async with running(worker):
        postgres_proxy.cut("reset")
        await broker.publish(*events)

        async def retrying() -> bool:
            return retry_count(worker.metrics) >= 5

        await wait_until(retrying, "the worker to retry against the cut database")
        ready, _ = await broker.depth(broker.topology.dead_letter_queue("audit"))
        assert ready == 0
        assert await audit_table.count() == 0

        postgres_proxy.restore()
        await wait_until(rows_reach(audit_table, len(events)), "every row after restore")

        async def all_acked() -> bool:
            return settled_count(worker.metrics, "acked") + settled_count(
                worker.metrics, "retried"
            ) >= len(events)

        await wait_until(all_acked, "every message acked")
    ready, _ = await broker.depth(broker.topology.dead_letter_queue("audit"))
    rows = await audit_table.count()
    report_counts(
        sent=len(events),
        retries=retry_count(worker.metrics),
        dead_lettered=settled_count(worker.metrics, "dead_lettered"),
        dlq_depth=ready,
        rows=rows,
    )
    assert settled_count(worker.metrics, "dead_lettered") == 0
    assert ready == 0
    assert sorted(await audit_table.event_ids()) == sorted(e.event_id for e in events)
