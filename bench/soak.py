"""The soak run: many closes (200k by default) through the API with its relay, in
rounds of wrk; after each round the API's resident memory and the outbox length, which
should both level off. No workers run; the worker queues are emptied after each round
so the shared RabbitMQ does not keep 2 x 200k messages."""

from __future__ import annotations

import math
from dataclasses import dataclass

import aiohttp

from bench.load import PROBE, WARMUP_SECONDS, wait_relay_live, wrk_closes
from bench.report import table, verdict
from bench.seed import seed_sessions, seed_tokens
from bench.stack import Stack, memory_kib
from bench.wrk import WrkResult

ROUND_SECONDS = 10.0
SEED_MARGIN = 1.6


@dataclass(frozen=True, slots=True)
class Round:
    closes_so_far: int
    wrk: WrkResult
    rss_mib: float
    peak_rss_mib: float
    outbox: int


async def run(stack: Stack, *, closes: int, connections: int) -> list[Round]:
    await seed_tokens(stack.redis, stack.keys, stack.run_id)
    api = await stack.start_api()
    async with aiohttp.ClientSession() as http:
        await wait_relay_live(stack, http)
    first = PROBE + 1
    seeded = 20_000
    await seed_sessions(stack.redis, stack.keys, stack.run_id, first, seeded)
    warm = await wrk_closes(stack, first, seeded, seconds=WARMUP_SECONDS, connections=connections)
    first += seeded
    rate = warm.rate
    done = 0
    rounds: list[Round] = []
    while done < closes:
        seconds = min(ROUND_SECONDS, max(1.0, (closes - done) / rate))
        count = math.ceil(rate * seconds * SEED_MARGIN) + 2000
        await seed_sessions(stack.redis, stack.keys, stack.run_id, first, count)
        result = await wrk_closes(stack, first, count, seconds=seconds, connections=connections)
        first += count
        done += min(result.requests, count)
        rate = result.rate
        api.check_alive()
        rounds.append(
            Round(
                closes_so_far=done,
                wrk=result,
                rss_mib=memory_kib(api.pid, "VmRSS") / 1024,
                peak_rss_mib=memory_kib(api.pid, "VmHWM") / 1024,
                outbox=await stack.outbox_length(),
            )
        )
        await stack.queue_depths(purge=True)
    return rounds


def render(rounds: list[Round]) -> str:
    rows = [
        [
            n,
            r.closes_so_far,
            r.wrk.rate,
            r.wrk.p99_ms,
            r.wrk.non_2xx + r.wrk.socket_errors,
            r.rss_mib,
            r.peak_rss_mib,
            r.outbox,
        ]
        for n, r in enumerate(rounds, 1)
    ]
    first = table(
        ["round", "closes", "req/s", "p99 ms", "non-2xx", "RSS MiB", "peak MiB", "outbox"], rows
    )
    half = rounds[len(rounds) // 2]
    last = rounds[-1]
    growth = last.rss_mib / half.rss_mib - 1
    errors = sum(r.wrk.non_2xx + r.wrk.socket_errors for r in rounds)
    # Flat: the backlog at the end is no larger than at half-time, or than one second of
    # closes (what a relay that keeps up may hold at any moment).
    outbox_limit = max(half.outbox, int(last.wrk.rate))
    checks: list[list[object]] = [
        ["closes", last.closes_so_far, "", ""],
        ["RSS growth over the second half", f"{growth:+.1%}", "<= +5%", verdict(growth <= 0.05)],
        [
            "outbox at the end (entries)",
            last.outbox,
            f"<= {outbox_limit:,}",
            verdict(last.outbox <= outbox_limit),
        ],
        [
            "API peak RSS (MiB)",
            f"{last.peak_rss_mib:.1f}",
            "<= 120",
            verdict(last.peak_rss_mib <= 120),
        ],
        ["non-2xx + socket errors", errors, "0", verdict(errors == 0)],
    ]
    return f"{first}\n\n{table(['measure', 'value', 'target', ''], checks)}"
