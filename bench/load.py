"""The load run: the close endpoint (relay publishing in the same process) and the bare
endpoint, each driven by wrk at the same concurrency; then the relay's drain rate."""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench import clustered, replicated, traced
from bench.client import close_one
from bench.cpu import CpuMeter
from bench.report import table, verdict
from bench.seed import seed_sessions, seed_tokens
from bench.stack import Process, Stack, cpu_seconds, memory_kib, wait_until
from bench.wrk import WrkResult, run_wrk
from session_close.keys import bucket_of

log = logging.getLogger(__name__)

WARMUP_SECONDS = 2.0
WARMUP_SESSIONS = 30_000
# Seed this many times the warm-up rate, so the measured run never runs out of sessions.
SEED_MARGIN = 1.6
DRAIN_TIMEOUT_SECONDS = 120.0

PROBE = 0  # session index used to check the relay is publishing before measuring


@dataclass(frozen=True, slots=True)
class LoadResult:
    bare: WrkResult
    close: WrkResult
    no_relay: WrkResult
    seeded: int
    api_peak_rss_mib: float
    api_cpu_share: float  # API CPU seconds per wall second during the run
    backlog_at_end: int
    drain_seconds: float
    tombstones: int
    events_queued: dict[str, int]
    relay_entries: int
    relay_seconds: float
    # The same close run on a primary with one replica of the run's own.
    replica_no_wait: WrkResult
    replica_wait: WrkResult
    # The same close run on a Redis Cluster of three primaries of the run's own.
    cluster: WrkResult
    # The close run with tracing on (OTLP/HTTP to a receiver of the run's own).
    traced: WrkResult
    trace_exports: int
    trace_bytes: int

    @property
    def ratio(self) -> float:
        return self.close.rate / self.bare.rate

    @property
    def relay_rate(self) -> float:
        return self.relay_entries / self.relay_seconds

    @property
    def events_lost(self) -> int:
        return max(self.tombstones - n for n in self.events_queued.values())


async def wait_relay_live(stack: Stack, http: aiohttp.ClientSession) -> None:
    """Close one session and wait until its event left the outbox."""
    await seed_sessions(stack.redis, stack.keys, stack.run_id, PROBE, 1)
    kind = await close_one(http, stack.url, stack.run_id, PROBE)
    if kind != "success":
        raise RuntimeError(f"probe close answered {kind!r}; see {stack.workdir}/api.log")
    await wait_until("relay publishing the probe event", stack.outbox_empty, 60)


async def wrk_closes(
    stack: Stack, first: int, count: int, *, seconds: float, connections: int
) -> WrkResult:
    """Close the seeded sessions first..first+count-1 with wrk for `seconds`."""
    return await run_wrk(
        stack.url,
        seconds=seconds,
        connections=connections,
        run_id=stack.run_id,
        first=first,
        count=count,
    )


async def measure_bare(stack: Stack, seconds: float, connections: int) -> WrkResult:
    bare, url = await stack.start_bare()
    try:
        await run_wrk(url, seconds=1, connections=connections, run_id="x", first=0, count=10**9)
        return await run_wrk(
            url, seconds=seconds, connections=connections, run_id="x", first=0, count=10**9
        )
    finally:
        stack.stop(bare)


async def measure_close(
    stack: Stack,
    api: Process,
    seconds: float,
    connections: int,
    profile: Path | None,
    first: int,
    *,
    relay: bool = True,
) -> tuple[WrkResult, int, float]:
    """wrk over sessions first.. (seeded here); returns the result, the next unused
    session index, and the API's CPU share during the run."""
    await seed_sessions(stack.redis, stack.keys, stack.run_id, first, WARMUP_SESSIONS)
    warm = await wrk_closes(
        stack, first, WARMUP_SESSIONS, seconds=WARMUP_SECONDS, connections=connections
    )
    first += WARMUP_SESSIONS
    count = math.ceil(warm.rate * seconds * SEED_MARGIN) + 5000
    await seed_sessions(stack.redis, stack.keys, stack.run_id, first, count)
    if relay:  # the warm-up's events should be out before the measured run starts
        await wait_until("outbox drained after warm-up", stack.outbox_empty, DRAIN_TIMEOUT_SECONDS)
    spy = await _py_spy(api, seconds, profile) if profile else None
    meter = CpuMeter({"api": api.pid})
    meter.start()
    cpu0, t0 = cpu_seconds(api.pid), time.monotonic()
    result = await wrk_closes(stack, first, count, seconds=seconds, connections=connections)
    if spy is not None:
        await asyncio.wait_for(spy.wait(), 30)
    cpu_share = (cpu_seconds(api.pid) - cpu0) / (time.monotonic() - t0)
    log.info("close run done", extra={"relay": relay, "cpu": meter.stop()})
    if result.sent > count:
        log.warning("wrk ran past the seeded sessions; raise SEED_MARGIN", extra={"seeded": count})
    return result, first + count, cpu_share


async def _py_spy(api: Process, seconds: float, out: Path) -> asyncio.subprocess.Process:
    """py-spy sampling the API during the measured run; folded stacks (flamegraph input)."""
    py_spy = Path(sys.executable).with_name("py-spy")
    if not py_spy.exists():
        raise RuntimeError("--profile needs py-spy: .venv/bin/pip install -e '.[dev]'")
    return await asyncio.create_subprocess_exec(
        str(py_spy),
        "record",
        "--pid",
        str(api.pid),
        "--duration",
        str(max(1, int(seconds))),
        "--rate",
        "250",
        "--nonblocking",
        "--format",
        "raw",
        "--output",
        str(out),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


async def fill_outbox(stack: Stack, entries: int) -> None:
    """Outbox entries exactly as close_sessions.lua writes them."""
    closed_at = "2024-01-01T00:00:00.000Z"
    for start in range(0, entries, 2000):
        pipe = stack.redis.pipeline(transaction=False)
        for i in range(start, min(start + 2000, entries)):
            pipe.xadd(
                stack.keys.outbox(bucket_of("bu0")),
                {
                    "event_id": f"00000000-0000-4000-8000-{i:012d}",
                    "session_id": f"relay-{stack.run_id}-{i}",
                    "user_id": "bu0",
                    "closed_at": closed_at,
                    "os": "Android",
                    "app_version": "1.0.10",
                    "request_id": f"relay-{i}",
                },
            )
        await pipe.execute()


async def measure_relay(stack: Stack, entries: int) -> tuple[int, float]:
    """The relay's drain rate: with no API running, fill the outbox, then start an (idle)
    API and time its relay from the first published entry to the last. Returns the
    entries timed and the seconds they took."""
    await fill_outbox(stack, entries)
    api = await stack.start_api()
    deadline = time.monotonic() + DRAIN_TIMEOUT_SECONDS
    first_seen: tuple[int, float] | None = None
    while True:
        length, now = await stack.outbox_length(), time.monotonic()
        if first_seen is None and length < entries:
            first_seen = (length, now)
        if length == 0:
            break
        if now > deadline:
            raise TimeoutError(f"relay drain: {length} entries left after {DRAIN_TIMEOUT_SECONDS}s")
        api.check_alive()
        await asyncio.sleep(0.01)
    stack.stop(api)
    assert first_seen is not None
    return first_seen[0], now - first_seen[1]


async def run(
    stack: Stack, *, seconds: float, connections: int, relay_entries: int, profile: Path | None
) -> LoadResult:
    await seed_tokens(stack.redis, stack.keys, stack.run_id)
    bare = await measure_bare(stack, seconds, connections)
    api = await stack.start_api()
    async with aiohttp.ClientSession() as http:
        await wait_relay_live(stack, http)
    close, seeded, cpu_share = await measure_close(
        stack, api, seconds, connections, profile, PROBE + 1
    )
    backlog_at_end = await stack.outbox_length()
    drain_seconds = await wait_until(
        "outbox drained after the run", stack.outbox_empty, DRAIN_TIMEOUT_SECONDS
    )
    api.check_alive()
    peak_rss = memory_kib(api.pid, "VmHWM") / 1024
    tombstones = await stack.count_keys("{b*}:session:closed:*")
    queued = await stack.queue_depths(purge=True)
    stack.stop(api)
    relay_timed, relay_seconds = await measure_relay(stack, relay_entries)
    await stack.queue_depths(purge=True)
    # The same run with the relay off shows what publishing costs the request path.
    api = await stack.start_api(relay=False)
    no_relay, seeded, _ = await measure_close(
        stack, api, seconds, connections, None, seeded, relay=False
    )
    stack.stop(api)
    await stack.queue_depths(purge=True)
    traced_close, seeded, receiver = await traced.measure(stack, seconds, connections, seeded)
    await stack.queue_depths(purge=True)
    replica_no_wait, replica_wait = await replicated.measure(stack, seconds, connections)
    cluster = await clustered.measure(stack, seconds, connections)
    return LoadResult(
        bare=bare,
        close=close,
        no_relay=no_relay,
        seeded=seeded,
        api_peak_rss_mib=peak_rss,
        api_cpu_share=cpu_share,
        backlog_at_end=backlog_at_end,
        drain_seconds=drain_seconds,
        tombstones=tombstones,
        events_queued=queued,
        relay_entries=relay_timed,
        relay_seconds=relay_seconds,
        replica_no_wait=replica_no_wait,
        replica_wait=replica_wait,
        cluster=cluster,
        traced=traced_close,
        trace_exports=receiver.exports,
        trace_bytes=receiver.bytes,
    )


def render(r: LoadResult, connections: int) -> str:
    rows: list[list[object]] = []
    for name, w in (
        ("bare aiohttp (ceiling)", r.bare),
        ("close + relay", r.close),
        ("close, relay off", r.no_relay),
        ("close + relay, tracing on", r.traced),
        ("close, own primary + replica", r.replica_no_wait),
        ("close, REDIS_MIN_REPLICAS=1", r.replica_wait),
        ("close + relay, Redis Cluster", r.cluster),
    ):
        errors = w.non_2xx + w.socket_errors
        rows.append([name, w.requests, w.rate, w.p50_ms, w.p99_ms, errors, w.rate / r.bare.rate])
    first = table(["endpoint", "requests", "req/s", "p50 ms", "p99 ms", "non-2xx", "x bare"], rows)
    checks: list[list[object]] = [
        ["close / bare throughput", f"{r.ratio:.2f}", ">= 0.40", verdict(r.ratio >= 0.40)],
        ["close p99 (ms)", f"{r.close.p99_ms:.2f}", "<= 10", verdict(r.close.p99_ms <= 10)],
        [
            "close non-2xx + socket errors",
            r.close.non_2xx + r.close.socket_errors,
            "0",
            verdict(r.close.non_2xx + r.close.socket_errors == 0),
        ],
        [
            "API peak RSS (MiB, VmHWM)",
            f"{r.api_peak_rss_mib:.1f}",
            "<= 120",
            verdict(r.api_peak_rss_mib <= 120),
        ],
        [
            "relay drain rate (events/s)",
            f"{r.relay_rate:,.0f}",
            ">= 5,000",
            verdict(r.relay_rate >= 5000),
        ],
        [
            "events lost (closed - queued)",
            r.events_lost,
            "0",
            verdict(r.events_lost == 0),
        ],
        ["tracing on / off (close + relay req/s)", f"{r.traced.rate / r.close.rate:.2f}", "", ""],
    ]
    second = table(["measure", "value", "target", ""], checks)
    us_per_close = r.api_cpu_share / r.close.rate * 1e6
    notes = "\n".join(
        [
            f"{connections} connections, one wrk thread. API CPU during the run: "
            f"{r.api_cpu_share:.0%} of a core, {us_per_close:.0f} us per close.",
            f"Outbox: {r.backlog_at_end:,} entries when wrk stopped, drained in "
            f"{r.drain_seconds:.1f}s. Sessions closed {r.tombstones:,}; events queued per "
            f"worker queue {r.events_queued}.",
            f"Relay: of an outbox filled before the API started, {r.relay_entries:,} entries "
            f"published in {r.relay_seconds:.2f}s by the idle API's relay.",
            "The last two rows run on a primary with one replica of the run's own (AOF on): "
            "REDIS_MIN_REPLICAS=0, then 1 (one WAIT per close batch). The cluster row: three "
            "primaries of the run's own (no persistence), REDIS_CLUSTER=true, relay in the API.",
            "Tracing is off in every row but 'tracing on', where the API (and its relay) "
            "exported spans by OTLP/HTTP to a receiver of the run's own: "
            f"{r.trace_exports:,} exports, {r.trace_bytes / 1024**2:.1f} MiB.",
        ]
    )
    return f"{first}\n\n{second}\n\n{notes}"
