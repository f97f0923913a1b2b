"""Fixtures and helpers for the worker tests: publish events to the test's exchange,
look at its queues and audit table, run a worker in this process or as a subprocess
with the test's environment. Its fixtures are a pytest plugin (tests/conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from session_close.events import CLOSED, CONTENT_TYPE, SessionEvent
from session_close.logs import EACH
from session_close.retry import Policy
from session_close.settings import Settings
from session_close.topology import Topology
from tests.support.paths import ROOT
from tests.support.processes import settings_env
from tests.support.waiting import wait_until
from workers.audit import create_table_sql
from workers.effect import Effect, EffectFactory
from workers.metrics import WorkerMetrics
from workers.runner import Worker


def logged_lines(records: list[logging.LogRecord]) -> list[dict[str, Any]]:
    """The lines of the records the workers log a line per event through (one record per
    batch, session_close.logs.log_each), as the JSON lines on stdout would carry them."""
    return [line for record in records for line in record.__dict__.get(EACH, ())]


def opening(effect: Effect) -> EffectFactory:
    """An EffectFactory that yields a test-only effect object as it is."""

    @contextlib.asynccontextmanager
    async def open_effect(_: Settings) -> AsyncIterator[Effect]:
        yield effect

    return open_effect


def make_event(
    n: int = 0,
    *,
    session_id: str | None = None,
    user_id: str = "u1",
    closed_at: str = "2026-01-02T03:04:05.123456+00:00",
) -> SessionEvent:
    return SessionEvent(
        event_id=str(uuid.uuid4()),
        session_id=session_id or f"session-{n:05d}-{uuid.uuid4().hex[:8]}",
        user_id=user_id,
        closed_at=closed_at,
        os="Android",
        app_version="1.0.10",
        request_id=f"req-{uuid.uuid4().hex[:12]}",
    )


# A user id that the audit table of `table_rejecting` refuses: a value the database
# rejects for its content on every attempt, though the event itself is well formed.
REJECTED_USER = "rejected-by-the-database"


async def table_rejecting(settings: Settings, user_id: str = REJECTED_USER) -> None:
    """Create the test's audit table (as the worker would) with a CHECK constraint that
    fails every row of `user_id`."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute(create_table_sql(settings.audit_table))
        await conn.execute(
            f'ALTER TABLE "{settings.audit_table}" ADD CONSTRAINT refuses_a_user '
            f"CHECK (user_id <> '{user_id}')"
        )
    finally:
        await conn.close()


class Broker:
    """The test's exchange and queues, seen from a connection of its own."""

    def __init__(self, settings: Settings, connection: AbstractRobustConnection) -> None:
        self.settings = settings
        self.topology = Topology.from_settings(settings)
        self._connection = connection
        self._channel: AbstractChannel | None = None

    async def channel(self) -> AbstractChannel:
        if self._channel is None:
            self._channel = await self._connection.channel(publisher_confirms=True)
            await self.topology.declare(self._channel)
        return self._channel

    async def publish(self, *events: SessionEvent) -> None:
        await asyncio.gather(
            *(self.publish_raw(e.encode(self.settings.event_source), e.event_id) for e in events)
        )

    async def publish_in_order(self, *events: SessionEvent) -> None:
        """One after the other, each confirmed: the queue holds them in this order."""
        for event in events:
            await self.publish_raw(event.encode(self.settings.event_source), event.event_id)

    async def publish_raw(
        self,
        body: bytes,
        message_id: str | None = None,
        *,
        to_dead_letters: str | None = None,
        content_type: str = CONTENT_TYPE,
    ) -> None:
        """Publish to the test's exchange, or (to_dead_letters=worker) the way the broker
        dead-letters: through the dead-letter exchange to that worker's DLQ."""
        channel = await self.channel()
        message = aio_pika.Message(
            body,
            content_type=content_type,
            message_id=message_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers={"x-test": "kept"},
        )
        if to_dead_letters is None:
            exchange = await channel.get_exchange(self.topology.exchange, ensure=False)
            await exchange.publish(message, CLOSED)
        else:
            dlx = await channel.get_exchange(self.topology.dead_letter_exchange, ensure=False)
            await dlx.publish(message, self.topology.queue(to_dead_letters))

    async def depth(self, queue: str) -> tuple[int, int]:
        """(ready messages, consumers) of a queue."""
        channel = await self._connection.channel()
        try:
            declared = await channel.declare_queue(queue, passive=True)
            result = declared.declaration_result
            return result.message_count or 0, result.consumer_count or 0
        finally:
            await channel.close()


@pytest.fixture
async def broker(settings: Settings, amqp_cleanup: None) -> AsyncIterator[Broker]:
    """Topology declared (as the API does) before any worker starts."""
    connection = await aio_pika.connect_robust(settings.amqp_url)
    broker = Broker(settings, connection)
    await broker.channel()
    yield broker
    await connection.close()


class AuditTable:
    def __init__(self, conn: asyncpg.Connection, table: str) -> None:
        self._conn = conn
        self.table = table

    async def exists(self) -> bool:
        return bool(await self._conn.fetchval("SELECT to_regclass($1) IS NOT NULL", self.table))

    async def count(self) -> int:
        if not await self.exists():
            return 0
        return int(await self._conn.fetchval(f'SELECT count(*) FROM "{self.table}"'))

    async def event_ids(self) -> list[str]:
        rows = await self._conn.fetch(f'SELECT event_id FROM "{self.table}"')
        return [str(row["event_id"]) for row in rows]

    async def row(self, event_id: str) -> dict[str, Any]:
        found = await self._conn.fetchrow(
            f'SELECT * FROM "{self.table}" WHERE event_id = $1', uuid.UUID(event_id)
        )
        assert found is not None, f"no audit row for {event_id}"
        return dict(found)


@pytest.fixture
async def audit_table(settings: Settings) -> AsyncIterator[AuditTable]:
    """The test's audit table (created by the worker), dropped afterwards."""
    conn = await asyncpg.connect(settings.database_url)
    yield AuditTable(conn, settings.audit_table)
    await conn.execute(f'DROP TABLE IF EXISTS "{settings.audit_table}"')
    await conn.close()


@contextlib.asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[Worker]:
    """A worker in this process, consuming until the block ends."""
    task = asyncio.create_task(worker.run())
    consuming = asyncio.create_task(worker.consuming.wait())
    await asyncio.wait({task, consuming}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
    if not consuming.done():
        consuming.cancel()
        if task.done():
            task.result()  # raises what stopped the worker
        task.cancel()
        pytest.fail("worker did not start consuming within 15s")
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 20)


def in_process(
    settings: Settings,
    name: str,
    open_effect: EffectFactory,
    *,
    metrics: WorkerMetrics | None = None,
    heartbeat_seconds: float = 0.1,
    **overrides: Any,
) -> Worker:
    return Worker(
        dataclasses.replace(settings, **overrides),
        name,
        open_effect,
        metrics=metrics,
        retry_policy=Policy(first=0.1, cap=0.5),
        heartbeat_seconds=heartbeat_seconds,
    )


class WorkerProcess:
    """`python -m workers <args>` as a subprocess; its JSON log lines are collected."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[dict[str, Any]] = []
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, settings: Settings, *args: str) -> WorkerProcess:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "workers",
            *args,
            cwd=ROOT,
            env=settings_env(settings),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        return cls(process)

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            try:
                self.lines.append(json.loads(raw))
            except ValueError:
                self.lines.append({"event": raw.decode(errors="replace").rstrip()})

    def logged(self, fragment: str, **fields: object) -> list[dict[str, Any]]:
        """The lines whose message holds `fragment` and that have these field values."""
        return [
            line
            for line in self.lines
            if fragment in str(line.get("event", ""))
            and all(line.get(name) == value for name, value in fields.items())
        ]

    async def wait_logged(
        self,
        fragment: str,
        timeout: float = 15.0,  # noqa: ASYNC109
        **fields: object,
    ) -> None:
        async def seen() -> bool:
            if self.process.returncode is not None:
                pytest.fail(f"worker exited {self.process.returncode}: {self.lines[-5:]}")
            return bool(self.logged(fragment, **fields))

        await wait_until(seen, f"the worker to log {fragment!r}", within=timeout)

    def signal(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    async def wait(self, timeout: float) -> int:  # noqa: ASYNC109
        code = await asyncio.wait_for(self.process.wait(), timeout)
        await asyncio.wait_for(self._reader, 5)
        return code

    async def close(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


@pytest.fixture
async def worker_processes() -> AsyncIterator[list[WorkerProcess]]:
    """Append started WorkerProcess objects here; any still running are killed after."""
    started: list[WorkerProcess] = []
    yield started
    for process in started:
        await process.close()


# What a worker's metrics counted, read the way Prometheus would (the worker itself never
# reads its counters back).
def _sample(metrics: WorkerMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, {"worker": metrics.worker, **labels}) or 0.0


def settled_count(metrics: WorkerMetrics, outcome: str) -> float:
    return _sample(metrics, "worker_messages_total", outcome=outcome)


def retry_count(metrics: WorkerMetrics) -> float:
    return _sample(metrics, "worker_retries_total")


def dead_letter_count(metrics: WorkerMetrics, reason: str) -> float:
    return _sample(metrics, "worker_dead_letters_total", reason=reason)


def ack_frame_count(metrics: WorkerMetrics) -> float:
    return _sample(metrics, "worker_ack_frames_total")
