"""Who used the CPU during a measured stretch: the run's own processes and the shared
services (by process name), and the whole machine, from /proc."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

SERVICES = ("redis-server", "beam.smp", "postgres")


def _ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _ticks_of(pids: list[int]) -> int:
    """The processes' CPU ticks; those gone count for nothing."""
    total = 0
    for pid in pids:
        try:
            total += _ticks(pid)
        except OSError:
            continue
    return total


def _pids_named(name: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == name:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _machine_busy() -> tuple[int, int]:
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


class CpuMeter:
    """CPU share (1.0 = one core) of each named group of processes between start() and
    stop(); processes gone meanwhile count for what they used until the last sample."""

    def __init__(self, own: dict[str, int]) -> None:
        self._groups = {name: [pid] for name, pid in own.items()}
        for service in SERVICES:
            pids = _pids_named(service)
            if pids:
                self._groups[service] = pids
        self._start: dict[str, int] = {}
        self._t0 = 0.0
        self._machine0 = (0, 0)
        self.shares: dict[str, float] = {}  # by group, after stop(); 1.0 = one core
        self.busy = 0.0  # the machine's busy share of all its cores, after stop()

    def _sample(self) -> dict[str, int]:
        return {name: _ticks_of(pids) for name, pids in self._groups.items()}

    def start(self) -> None:
        self._start = self._sample()
        self._t0 = time.monotonic()
        self._machine0 = _machine_busy()

    def stop(self) -> str:
        end = self._sample()
        seconds = time.monotonic() - self._t0
        hz = os.sysconf("SC_CLK_TCK")
        busy1, total1 = _machine_busy()
        busy = (busy1 - self._machine0[0]) / max(1, total1 - self._machine0[1])
        used = {name: (end[name] - self._start.get(name, 0)) / hz / seconds for name in end}
        cores = os.cpu_count() or 1
        # The rest of the busy time: wrk, the bench itself, the kernel's own work.
        other = max(0.0, busy * cores - sum(used.values()))
        self.shares, self.busy = {**used, "other": other}, busy
        shares = [f"{name} {share:.0%}" for name, share in used.items()] + [f"other {other:.0%}"]
        return (
            f"CPU (100% = one core): {', '.join(shares)}; machine {busy:.0%} busy of {cores} cores"
        )


async def quiet(
    service: str, *, below: float = 0.05, window: float = 0.5, within: float = 15.0
) -> None:
    """Wait until the shared service's processes use less than `below` of a core over a
    `window` (RabbitMQ writes and compacts its quorum queues for a while after a burst of
    publishes); give up after `within` seconds."""
    pids = _pids_named(service)
    hz = os.sysconf("SC_CLK_TCK")
    deadline = time.monotonic() + within

    while time.monotonic() < deadline:
        before = _ticks_of(pids)
        await asyncio.sleep(window)
        if (_ticks_of(pids) - before) / hz / window < below:
            return
