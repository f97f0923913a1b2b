"""The sustained run: a fixed close rate with the relay in the API and both workers
running; end-to-end latency from the close (the event's closedAt, taken just before the
reply) to the audit row (recorded_at), and exactly-once checks on both workers' effects."""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass

import aiohttp
import asyncpg

from bench.client import PacedResult, close_one, paced, percentile
from bench.cpu import CpuMeter
from bench.report import table, verdict
from bench.seed import USERS, seed_sessions, seed_tokens, session_id
from bench.stack import Stack, memory_kib, wait_until

log = logging.getLogger(__name__)

SETTLE_TIMEOUT_SECONDS = 120.0


@dataclass(frozen=True, slots=True)
class SustainedResult:
    rate: float
    load: PacedResult
    rows: int
    distinct_sessions: int
    unexpected_rows: int  # rows for sessions whose close did not answer success
    e2e_p50_ms: float
    e2e_p99_ms: float
    e2e_max_ms: float
    push_tokens_left: int
    backlog_max: int
    api_peak_rss_mib: float
    cpu: str

    @property
    def succeeded(self) -> int:
        return len(self.load.succeeded)

    @property
    def lost(self) -> int:
        return self.succeeded - (self.distinct_sessions - self.unexpected_rows)

    @property
    def duplicates(self) -> int:
        return self.rows - self.distinct_sessions


async def _audit_rows(stack: Stack, db: asyncpg.Connection, probe_sid: str) -> int:
    table_name = stack.settings.audit_table
    exists = await db.fetchval("SELECT to_regclass($1) IS NOT NULL", table_name)
    if not exists:
        return 0
    count: int = await db.fetchval(
        f'SELECT count(*) FROM "{table_name}" WHERE session_id <> $1', probe_sid
    )
    return count


async def run(stack: Stack, *, rate: float, seconds: float) -> SustainedResult:
    total = int(rate * seconds)
    probe = total  # the session after the paced ones
    await seed_tokens(stack.redis, stack.keys, stack.run_id)
    await seed_sessions(stack.redis, stack.keys, stack.run_id, 0, total + 1, push=True)
    api = await stack.start_api()
    audit = stack.start_worker("audit")
    push = stack.start_worker("push-cleanup")
    db = await asyncpg.connect(stack.settings.database_url, timeout=10)
    try:
        # End to end once before measuring: relay, exchange, audit table all in place.
        async with aiohttp.ClientSession() as http:
            kind = await close_one(http, stack.url, stack.run_id, probe)
        if kind != "success":
            raise RuntimeError(f"probe close answered {kind!r}; see {stack.workdir}/api.log")
        probe_sid = session_id(stack.run_id, probe)

        async def probe_audited() -> bool:
            for process in stack.processes:
                process.check_alive()
            name = stack.settings.audit_table
            if not await db.fetchval("SELECT to_regclass($1) IS NOT NULL", name):
                return False
            found: bool = await db.fetchval(
                f'SELECT EXISTS (SELECT 1 FROM "{name}" WHERE session_id = $1)', probe_sid
            )
            return found

        await wait_until("probe event audited", probe_audited, 60)

        backlog_max = 0
        stop = asyncio.Event()

        async def sampler() -> None:
            nonlocal backlog_max
            while not stop.is_set():
                backlog_max = max(backlog_max, await stack.outbox_length())
                await asyncio.sleep(0.2)

        sampling = asyncio.create_task(sampler())
        meter = CpuMeter(
            {"api": api.pid, "audit": audit.pid, "push-cleanup": push.pid, "sender": os.getpid()}
        )
        meter.start()
        try:
            load = await paced(stack.url, stack.run_id, 0, rate=rate, seconds=seconds)
        finally:
            stop.set()
            await sampling
        cpu = meter.stop()

        async def settled() -> bool:
            for process in stack.processes:
                process.check_alive()
            return await _audit_rows(stack, db, probe_sid) >= len(load.succeeded)

        await wait_until("audit rows for every success", settled, SETTLE_TIMEOUT_SECONDS)
        # A duplicate would show up a little later than the rows themselves.
        await wait_until("outbox empty", stack.outbox_empty, SETTLE_TIMEOUT_SECONDS)

        async def queues_empty() -> bool:
            return not any((await stack.queue_depths()).values())

        await wait_until("worker queues empty", queues_empty, SETTLE_TIMEOUT_SECONDS, 0.2)
        name = stack.settings.audit_table
        stats = await db.fetchrow(
            f"""
            SELECT count(*) AS rows,
                   count(DISTINCT session_id) AS sessions,
                   percentile_cont(0.5) WITHIN GROUP (ORDER BY lag) AS p50,
                   percentile_cont(0.99) WITHIN GROUP (ORDER BY lag) AS p99,
                   max(lag) AS max
            FROM (SELECT session_id,
                         extract(epoch FROM recorded_at - closed_at) * 1000 AS lag
                  FROM "{name}" WHERE session_id <> $1) AS t
            """,
            probe_sid,
        )
        closed = {session_id(stack.run_id, i) for i in load.succeeded}
        recorded = {
            r["session_id"]
            for r in await db.fetch(
                f'SELECT session_id FROM "{name}" WHERE session_id <> $1', probe_sid
            )
        }
        pipe = stack.redis.pipeline(transaction=False)
        for u in range(USERS):
            pipe.hlen(stack.keys.user_push(f"bu{u}"))
        push_left = sum(await pipe.execute())
        # Tokens of sessions that were not closed are meant to stay.
        push_left -= total - len(load.succeeded)
        api.check_alive()
        return SustainedResult(
            rate=rate,
            load=load,
            rows=stats["rows"],
            distinct_sessions=stats["sessions"],
            unexpected_rows=len(recorded - closed),
            e2e_p50_ms=float(stats["p50"] or 0),
            e2e_p99_ms=float(stats["p99"] or 0),
            e2e_max_ms=float(stats["max"] or 0),
            push_tokens_left=push_left,
            backlog_max=backlog_max,
            api_peak_rss_mib=memory_kib(api.pid, "VmHWM") / 1024,
            cpu=cpu,
        )
    finally:
        await db.close()


def render(r: SustainedResult) -> str:
    load = r.load
    achieved = load.sent / load.seconds if load.seconds else 0.0
    failed = sum(load.other.values())
    first = table(
        [
            "closes sent",
            "rate/s",
            "success",
            "other replies",
            "HTTP p50 ms",
            "HTTP p99 ms",
            "e2e p50 ms",
            "e2e p99 ms",
            "e2e max ms",
        ],
        [
            [
                load.sent,
                achieved,
                r.succeeded,
                failed,
                percentile(load.latencies_ms, 50),
                percentile(load.latencies_ms, 99),
                r.e2e_p50_ms,
                r.e2e_p99_ms,
                r.e2e_max_ms,
            ]
        ],
    )
    checks: list[list[object]] = [
        ["end-to-end p99 (ms)", f"{r.e2e_p99_ms:.1f}", "<= 250", verdict(r.e2e_p99_ms <= 250)],
        ["non-success replies", failed, "0", verdict(failed == 0)],
        ["events lost (success without row)", r.lost, "0", verdict(r.lost == 0)],
        ["duplicate rows", r.duplicates, "0", verdict(r.duplicates == 0)],
        ["rows without a success", r.unexpected_rows, "0", verdict(r.unexpected_rows == 0)],
        [
            "push tokens left of closed sessions",
            r.push_tokens_left,
            "0",
            verdict(r.push_tokens_left == 0),
        ],
        [
            "API peak RSS (MiB)",
            f"{r.api_peak_rss_mib:.1f}",
            "<= 120",
            verdict(r.api_peak_rss_mib <= 120),
        ],
    ]
    notes = (
        f"target {r.rate:,.0f}/s; audit rows {r.rows:,}; outbox at most {r.backlog_max:,} "
        f"entries during the run; sender at worst {load.late_ms:.1f} ms behind schedule"
    )
    if load.other:
        notes += f"; other replies: {load.other}"
    notes += f".\n{r.cpu}"
    return f"{first}\n\n{table(['measure', 'value', 'target', ''], checks)}\n\n{notes}"
