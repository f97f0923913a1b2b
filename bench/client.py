"""Closes sent from Python: one at a time (probes), or open-loop at a fixed rate.

The paced sender schedules request i at start + i/rate whatever the replies do, and
measures each latency from that scheduled time, so a stall shows up in the percentiles
instead of silently lowering the rate (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import aiohttp

from bench.seed import session_id, token

PATH = "/v1.0/session/close"
BODY = b'{ "requestContent": { } }'


def headers(run_id: str, i: int) -> dict[str, str]:
    return {
        "Content-Type": "application/json; multipart/form-data;",
        "Sessionid": session_id(run_id, i),
        "OS": "Android",
        "AppVersion": "1.0.10",
        "Authorization": f"Basic {token(run_id, i)}",
    }


async def close_one(http: aiohttp.ClientSession, url: str, run_id: str, i: int) -> str:
    """The reply's info.type (success, info, error)."""
    async with http.post(url + PATH, headers=headers(run_id, i), data=BODY) as resp:
        info_type: str = (await resp.json())["info"]["type"]
        return info_type


@dataclass
class PacedResult:
    sent: int = 0
    succeeded: list[int] = field(default_factory=list)  # session indexes closed now
    other: dict[str, int] = field(default_factory=dict)  # "<status> <info.type>" -> count
    latencies_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0
    late_ms: float = 0.0  # how far the sender itself fell behind its schedule, at worst


async def paced(
    url: str, run_id: str, first: int, *, rate: float, seconds: float, connections: int = 64
) -> PacedResult:
    result = PacedResult()
    total = int(rate * seconds)
    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

        async def one(i: int, due: float) -> None:
            try:
                async with http.post(url + PATH, headers=headers(run_id, i), data=BODY) as resp:
                    status = resp.status
                    info_type = (await resp.json())["info"]["type"]
            except (aiohttp.ClientError, TimeoutError) as exc:
                status, info_type = 0, type(exc).__name__
            result.latencies_ms.append((time.monotonic() - due) * 1000)
            if status == 200 and info_type == "success":
                result.succeeded.append(i)
            else:
                key = f"{status} {info_type}"
                result.other[key] = result.other.get(key, 0) + 1

        tasks = []
        start = time.monotonic()
        for n in range(total):
            due = start + n / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                result.late_ms = max(result.late_ms, -delay * 1000)
            tasks.append(asyncio.create_task(one(first + n, due)))
            result.sent += 1
        await asyncio.gather(*tasks)
        result.seconds = time.monotonic() - start
    return result


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]
