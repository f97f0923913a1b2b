"""Driving an endpoint with wrk (one thread, one process) and bench/close.lua."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from bench.seed import USERS

log = logging.getLogger(__name__)

SCRIPT = Path(__file__).with_name("close.lua")
PACED_SCRIPT = Path(__file__).with_name("paced.lua")


def ensure_wrk() -> str:
    """The wrk binary. The benchmarks never install anything themselves: `make setup`,
    run as root, installs the Debian packages the project needs, and names them otherwise."""
    found = shutil.which("wrk")
    if found is None:
        raise SystemExit(
            "bench: wrk is missing; install the Debian package 'wrk' "
            "(`sudo make setup` does, or `apt-get install wrk`)"
        )
    return found


@dataclass(frozen=True, slots=True)
class WrkResult:
    sent: int
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    non_2xx: int
    socket_errors: int

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


async def run_wrk(
    url: str,
    *,
    seconds: float,
    connections: int,
    run_id: str,
    first: int,
    count: int,
    rate: float | None = None,
) -> WrkResult:
    """Sessions first..first+count-1 are closed in order, one per request; as fast as
    the connections go, or at `rate` requests/s in total."""
    args = [
        ensure_wrk(),
        "-t1",
        f"-c{connections}",
        f"-d{max(1, math.ceil(seconds))}s",  # wrk takes whole seconds only
        "--timeout",
        "5s",
        "-s",
        str(SCRIPT if rate is None else PACED_SCRIPT),
        url,
        "--",
        run_id,
        str(USERS),
        str(first),
        str(count),
        *([] if rate is None else [str(rate)]),
    ]
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), seconds + 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = out.decode(errors="replace")
    line = next((ln for ln in text.splitlines() if ln.startswith("BENCH ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{text}")
    raw = json.loads(line.removeprefix("BENCH "))
    non_2xx = raw["status_errors"]
    for ln in text.splitlines():
        # wrk counts 3xx here too; its Lua summary only counts >= 400
        if "Non-2xx or 3xx responses:" in ln:
            non_2xx = max(non_2xx, int(ln.rsplit(":", 1)[1]))
    return WrkResult(
        sent=raw["sent"],
        requests=raw["requests"],
        seconds=raw["duration_us"] / 1e6,
        p50_ms=raw["p50_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        max_ms=raw["max_us"] / 1000,
        non_2xx=non_2xx,
        socket_errors=raw["connect_errors"]
        + raw["read_errors"]
        + raw["write_errors"]
        + raw["timeouts"],
    )
