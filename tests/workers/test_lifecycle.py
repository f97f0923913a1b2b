"""Workers across a broker connection killed under them, and on SIGTERM."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
from collections.abc import Callable

import aiohttp
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
    running,
)
from workers.audit import open_audit


async def _rows(table: AuditTable, n: int) -> bool:
    return await table.count() == n


@pytest.mark.fault
async def test_consumption_resumes_after_the_broker_connection_is_killed(
    settings: Settings,
    broker: Broker,
    audit_table: AuditTable,
    amqp_proxy: TcpProxy,
    caplog: pytest.LogCaptureFixture,
    report_counts: Callable[..., None],
) -> None:
    caplog.set_level(logging.INFO, logger="workers.audit")
    queue = broker.topology.queue("audit")
    worker = in_process(
        settings, "audit", open_audit, amqp_url=through(settings.amqp_url, amqp_proxy)
    )
    async with running(worker):
        await broker.publish(*[make_event(n) for n in range(5)])
        await wait_until(lambda: _rows(audit_table, 5), "rows before the cut")

        amqp_proxy.cut("reset")

        async def consumer_gone() -> bool:
            return (await broker.depth(queue))[1] == 0

        await wait_until(consumer_gone, "the broker to see the consumer's connection die")
        await broker.publish(*[make_event(n) for n in range(5, 10)])
        amqp_proxy.restore()

        # Published after the restore: only a consumer that really came back gets these.
        async def consumer_back() -> bool:
            return (await broker.depth(queue))[1] == 1

        await wait_until(consumer_back, "the consumer re-registered", within=30)
        await broker.publish(*[make_event(n) for n in range(10, 15)])
        await wait_until(lambda: _rows(audit_table, 15), "every row after the reconnect")
    # A redelivery (an ack lost with the cut) finds its row already written: the worker
    # logs it as already audited. Rows cannot double (event_id is the primary key).
    redelivered = logged_lines(
        [r for r in caplog.records if r.msg == "session close already audited"]
    )
    report_counts(sent=15, rows=await audit_table.count(), already_audited=len(redelivered))


@pytest.mark.fault
async def test_sigterm_exits_0_promptly_returning_the_messages_held_in_retry(
    settings: Settings,
    broker: Broker,
    audit_table: AuditTable,
    postgres_proxy: TcpProxy,
    worker_processes: list[WorkerProcess],
) -> None:
    proxied = dataclasses.replace(
        settings,
        database_url=through(settings.database_url, postgres_proxy),
        shutdown_timeout_seconds=5.0,
    )
    worker = await WorkerProcess.start(proxied, "audit", "--concurrency", "4", "--prefetch", "8")
    worker_processes.append(worker)
    await worker.wait_logged("consuming")
    postgres_proxy.cut("reset")
    events = [make_event(n) for n in range(12)]
    await broker.publish(*events)
    await worker.wait_logged("retrying")

    loop = asyncio.get_running_loop()
    started = loop.time()
    worker.signal(signal.SIGTERM)
    assert await worker.wait(10) == 0
    assert loop.time() - started < 3.0, "held messages must go back at once, not time out"
    assert worker.logged("stopped")

    # Every message is back in the queue, none dead-lettered; another worker writes them.
    ready = [
        (await broker.depth(q))[0]
        for q in (broker.topology.queue("audit"), broker.topology.dead_letter_queue("audit"))
    ]
    assert ready == [len(events), 0]
    postgres_proxy.restore()
    async with running(in_process(settings, "audit", open_audit)):
        await wait_until(lambda: _rows(audit_table, len(events)), "every row")


async def test_sigterm_finishes_the_messages_in_hand_and_logs_each_with_its_request_id(
    settings: Settings,
    broker: Broker,
    audit_table: AuditTable,
    worker_processes: list[WorkerProcess],
) -> None:
    events = {e.event_id: e for e in (make_event(n) for n in range(400))}
    await broker.publish(*events.values())
    worker = await WorkerProcess.start(
        settings, "audit", "--prefetch", "100", "--concurrency", "7", "--metrics-port", "0"
    )
    worker_processes.append(worker)
    await worker.wait_logged("consuming", prefetch=100, concurrency=7)
    [served] = worker.logged("serving metrics")
    port = served["port"]
    await wait_until(lambda: _at_least(audit_table, 1), "the first rows")
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/") as resp:
        exposition = await resp.text()
    assert 'worker_messages_total{outcome="acked",worker="audit"}' in exposition
    worker.signal(signal.SIGTERM)
    assert await worker.wait(settings.shutdown_timeout_seconds + 5) == 0

    written = set(await audit_table.event_ids())
    ready, consumers = await broker.depth(broker.topology.queue("audit"))
    assert consumers == 0
    assert len(written) + ready == len(events), "each message is either written or back"
    audited = worker.logged("audited")
    assert {line["event_id"] for line in audited} == written
    for line in audited:
        assert line["request_id"] == events[line["event_id"]].request_id
        assert line["session_id"].endswith("…"), "session ids are shortened in logs"


async def _at_least(table: AuditTable, n: int) -> bool:
    return await table.count() >= n
