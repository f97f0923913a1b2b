"""An outage of PostgreSQL never counts against WORKER_MAX_ATTEMPTS: one message, retried
many more times than its attempts while the database is cut off, still lands once the
database is back, and nothing is dead-lettered."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from session_close.settings import Settings
from tests.conftest import through
from tests.support.proxy import TcpProxy
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

MAX_ATTEMPTS = 2
# Retries of the one message during the outage: well past MAX_ATTEMPTS.
RETRIES = 5


@pytest.mark.fault
async def test_an_outage_longer_than_the_attempts_never_dead_letters_the_message(
    settings: Settings,
    broker: Broker,
    audit_table: AuditTable,
    postgres_proxy: TcpProxy,
    caplog: pytest.LogCaptureFixture,
    report_counts: Callable[..., None],
) -> None:
    caplog.set_level(logging.WARNING, logger="workers.runner")
    worker = in_process(
        settings,
        "audit",
        open_audit,
        database_url=through(settings.database_url, postgres_proxy),
        worker_max_attempts=MAX_ATTEMPTS,
    )
    event = make_event()
    async with running(worker):
        postgres_proxy.cut("reset")
        await broker.publish(event)

        def retries() -> list[logging.LogRecord]:
            return [
                r
                for r in caplog.records
                if r.msg == "worker could not apply event; retrying"
                and r.__dict__.get("event_id") == event.event_id
            ]

        def attempts() -> list[int]:
            return [int(r.__dict__["attempt"]) for r in retries()]

        def retried_enough() -> bool:
            # The same message, held and retried: its attempt number keeps climbing.
            assert settled_count(worker.metrics, "dead_lettered") == 0, (
                "dead-lettered in the outage"
            )
            return max(attempts(), default=0) >= RETRIES

        await wait_until(
            retried_enough, f"{RETRIES} retries of the message against the cut database", within=30
        )
        assert await audit_table.count() == 0
        postgres_proxy.restore()

        async def landed() -> bool:
            return await audit_table.count() == 1

        await wait_until(landed, "the row after the restore", within=30)
        await wait_until(lambda: settled_count(worker.metrics, "retried") == 1, "the message acked")
    ready, _ = await broker.depth(broker.topology.dead_letter_queue("audit"))
    report_counts(
        sent=1,
        retries=retry_count(worker.metrics),
        dead_lettered=settled_count(worker.metrics, "dead_lettered"),
        dlq_depth=ready,
    )
    assert await audit_table.event_ids() == [event.event_id]
    assert settled_count(worker.metrics, "dead_lettered") == 0
    assert ready == 0
    # Every retry was of this one message, and the outage was reported as transient.
    assert retry_count(worker.metrics) == len(attempts()) >= RETRIES
    assert all(r.__dict__["transient"] for r in retries())
