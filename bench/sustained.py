"""The sustained run: a fixed close rate with the relay in the API and both workers
running; end-to-end latency from the close (the event's closedAt, taken just before the
reply) to the audit row (recorded_at), and exactly-once checks on both workers' effects."""

from __future__ import annotations

import asyncio
import logging
import statistics
from dataclasses import dataclass

import aiohttp
import asyncpg

from bench.client import close_one
from bench.cpu import CpuMeter
from bench.report import table, verdict
from bench.seed import USERS, seed_sessions, seed_tokens, session_id
from bench.stack import Stack, memory_kib, wait_until
from bench.wrk import WrkResult, run_wrk

log = logging.getLogger(__name__)

SETTLE_TIMEOUT_SECONDS = 120.0


@dataclass(frozen=True, slots=True)
class SustainedResult:
    rate: float
    load: WrkResult
    closed: int  # sessions closed (tombstones in Redis), the probe excluded
    rows: int
    distinct_sessions: int
    e2e_p50_ms: float
    e2e_p99_ms: float
    e2e_max_ms: float
    push_tokens_left: int
    backlog_max: int
    api_peak_rss_mib: float
    cpu: str
    cpu_shares: dict[str, float]
    busy: float

    @property
    def lost(self) -> int:
        return self.closed - self.distinct_sessions

    @property
    def duplicates(self) -> int:
        return self.rows - self.distinct_sessions


async def _table_exists(db: asyncpg.Connection, name: str) -> bool:
    exists: bool = await db.fetchval("SELECT to_regclass($1) IS NOT NULL", name)
    return exists


async def run(stack: Stack, *, rate: float, seconds: float, connections: int) -> SustainedResult:
    # wrk may send a little past the duration; the spare sessions are never closed.
    total = int(rate * (seconds + 2)) + 1000
    probe = total  # the session after the paced ones
    name = stack.settings.audit_table
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

        def check_processes() -> None:
            for process in stack.processes:
                process.check_alive()

        async def probe_audited() -> bool:
            check_processes()
            if not await _table_exists(db, name):
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
        meter = CpuMeter({"api": api.pid, "audit": audit.pid, "push-cleanup": push.pid})
        meter.start()
        try:
            load = await run_wrk(
                stack.url,
                seconds=seconds,
                connections=connections,
                run_id=stack.run_id,
                first=0,
                count=total,
                rate=rate,
            )
        finally:
            stop.set()
            await sampling
        cpu = meter.stop()
        if load.sent > total:
            log.warning("wrk ran past the seeded sessions", extra={"seeded": total})
        closed = await stack.count_keys("{b*}:session:closed:*") - 1

        async def rows_written() -> int:
            count: int = await db.fetchval(
                f'SELECT count(*) FROM "{name}" WHERE session_id <> $1', probe_sid
            )
            return count

        async def settled() -> bool:
            check_processes()
            return await rows_written() >= closed

        await wait_until("audit rows for every close", settled, SETTLE_TIMEOUT_SECONDS)
        await wait_until("outbox empty", stack.outbox_empty, SETTLE_TIMEOUT_SECONDS)

        async def queues_empty() -> bool:
            return not any((await stack.queue_depths()).values())

        # A duplicate would be written after the rows themselves; wait for the queues.
        await wait_until("worker queues empty", queues_empty, SETTLE_TIMEOUT_SECONDS, 0.2)
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
        pipe = stack.redis.pipeline(transaction=False)
        for u in range(USERS):
            pipe.hlen(stack.keys.user_push(f"bu{u}"))
        # Tokens of the sessions that were not closed are meant to stay.
        push_left = sum(await pipe.execute()) - (total - closed)
        api.check_alive()
        return SustainedResult(
            rate=rate,
            load=load,
            closed=closed,
            rows=stats["rows"],
            distinct_sessions=stats["sessions"],
            e2e_p50_ms=float(stats["p50"] or 0),
            e2e_p99_ms=float(stats["p99"] or 0),
            e2e_max_ms=float(stats["max"] or 0),
            push_tokens_left=push_left,
            backlog_max=backlog_max,
            api_peak_rss_mib=memory_kib(api.pid, "VmHWM") / 1024,
            cpu=cpu,
            cpu_shares=meter.shares,
            busy=meter.busy,
        )
    finally:
        await db.close()


def render(r: SustainedResult) -> str:
    w = r.load
    errors = w.non_2xx + w.socket_errors
    first = table(
        [
            "closes",
            "rate/s",
            "non-2xx",
            "HTTP p50 ms",
            "HTTP p99 ms",
            "e2e p50 ms",
            "e2e p99 ms",
            "e2e max ms",
        ],
        [
            [
                r.closed,
                w.rate,
                errors,
                w.p50_ms,
                w.p99_ms,
                r.e2e_p50_ms,
                r.e2e_p99_ms,
                r.e2e_max_ms,
            ]
        ],
    )
    checks: list[list[object]] = [
        ["end-to-end p99 (ms)", f"{r.e2e_p99_ms:.1f}", "<= 250", verdict(r.e2e_p99_ms <= 250)],
        ["non-2xx + socket errors", errors, "0", verdict(errors == 0)],
        ["events lost (closed, no audit row)", r.lost, "0", verdict(r.lost == 0)],
        ["duplicate audit rows", r.duplicates, "0", verdict(r.duplicates == 0)],
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
        f"Target {r.rate:,.0f}/s from one paced wrk thread; {w.requests:,} replies, "
        f"{r.closed:,} sessions closed, {r.rows:,} audit rows; outbox at most "
        f"{r.backlog_max:,} entries during the run.\n{r.cpu}"
    )
    return f"{first}\n\n{table(['measure', 'value', 'target', ''], checks)}\n\n{notes}"


def render_rounds(results: list[SustainedResult]) -> str:
    """Every run's table, then one line per run and the medians the targets apply to."""
    each = "\n\n".join(f"run {i + 1}\n{render(r)}" for i, r in enumerate(results))
    groups = list(results[0].cpu_shares)
    headers = ["run", "HTTP p99 ms", "e2e p99 ms", *[f"{g} CPU" for g in groups], "machine busy"]

    def row(name: str, pick: list[SustainedResult] | None = None) -> list[object]:
        rs = pick or results
        med = statistics.median
        return [
            name,
            f"{med(r.load.p99_ms for r in rs):.2f}",
            f"{med(r.e2e_p99_ms for r in rs):.0f}",
            *[f"{med(r.cpu_shares.get(g, 0.0) for r in rs):.0%}" for g in groups],
            f"{med(r.busy for r in rs):.0%}",
        ]

    rows = [row(str(i + 1), [r]) for i, r in enumerate(results)] + [row("median")]
    http = statistics.median(r.load.p99_ms for r in results)
    e2e = statistics.median(r.e2e_p99_ms for r in results)
    lost = sum(r.lost for r in results)
    duplicates = sum(r.duplicates for r in results)
    left = sum(r.push_tokens_left for r in results)
    checks: list[list[object]] = [
        ["median HTTP p99 (ms)", f"{http:.2f}", "<= 10", verdict(http <= 10)],
        ["median end-to-end p99 (ms)", f"{e2e:.0f}", "<= 250", verdict(e2e <= 250)],
        ["events lost, all runs", lost, "0", verdict(lost == 0)],
        ["duplicate audit rows, all runs", duplicates, "0", verdict(duplicates == 0)],
        ["push tokens left, all runs", left, "0", verdict(left == 0)],
    ]
    summary = table(headers, rows)
    return (
        f"{each}\n\n{len(results)} runs (CPU: 100% = one core; machine busy: share of all "
        f"cores)\n{summary}\n\n{table(['measure', 'value', 'target', ''], checks)}"
    )
