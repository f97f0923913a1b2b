"""The processes and names of one benchmark run, and their cleanup.

Every run gets its own Redis key prefix, exchange, queue prefix and audit table, and
starts its own API (and workers, bare endpoint) on 127.0.0.1 and free ports, so it never
touches anyone else's data; close() stops what it started and deletes what it wrote,
also when the run failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import cast

import aio_pika
import asyncpg
from redis.asyncio import Redis, RedisCluster

from outbox.stream import backlog
from session_close.keys import BUCKETS, Keys
from session_close.settings import Settings
from session_close.topology import WORKERS, Topology

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
STOP_TIMEOUT_SECONDS = 15.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def memory_kib(pid: int, field: str) -> int:
    """VmHWM (peak resident set) or VmRSS of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise LookupError(field)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{tail}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                log.warning("process ignored SIGTERM; killing it", extra={"child": self.name})
                self.popen.kill()
                self.popen.wait()


class Stack:
    """Names, settings and processes of one run."""

    def __init__(self, base: Settings, workdir: Path) -> None:
        self.run_id = uuid.uuid4().hex[:8]
        self.settings = dataclasses.replace(
            base,
            http_host="127.0.0.1",
            http_port=free_port(),
            redis_key_prefix=f"bench:{self.run_id}:",
            amqp_exchange=f"bench.{self.run_id}.sessions",
            amqp_queue_prefix=f"bench.{self.run_id}.",
            audit_table=f"bench_audit_{self.run_id}",
        )
        self.keys = Keys(self.settings.redis_key_prefix)
        self.workdir = workdir
        self.processes: list[Process] = []
        # The bench's own client, with no timeout of the service's: it seeds in large
        # pipelines. A cluster's client sends each command to its slot's primary.
        self.redis: Redis = (
            cast(Redis, RedisCluster.from_url(self.settings.redis_url, decode_responses=True))
            if self.settings.redis_cluster
            else Redis.from_url(self.settings.redis_url, decode_responses=True)
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.http_port}"

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        s = self.settings
        env = dict(os.environ)
        env.update(
            HTTP_HOST=s.http_host,
            HTTP_PORT=str(s.http_port),
            REDIS_URL=s.redis_url,
            REDIS_KEY_PREFIX=s.redis_key_prefix,
            REDIS_CLUSTER=str(s.redis_cluster).lower(),
            AMQP_URL=s.amqp_url,
            AMQP_EXCHANGE=s.amqp_exchange,
            AMQP_QUEUE_PREFIX=s.amqp_queue_prefix,
            DATABASE_URL=s.database_url,
            AUDIT_TABLE=s.audit_table,
            PYTHONPATH=str(ROOT),
        )
        env.update(extra or {})
        return env

    def start(self, name: str, args: Sequence[str], env: dict[str, str] | None = None) -> Process:
        log_path = self.workdir / f"{name}.log"
        with log_path.open("wb") as out:
            popen = subprocess.Popen(
                [sys.executable, *args],
                cwd=ROOT,
                env=env or self.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C of the bench reaches it only through us
            )
        process = Process(name, popen, log_path)
        self.processes.append(process)
        return process

    async def start_api(self, *, relay: bool = True) -> Process:
        api = self.start("api", ["-m", "service"], self.env({"RELAY_ENABLED": str(relay).lower()}))
        await wait_for_port(api, self.settings.http_port)
        return api

    async def start_bare(self) -> tuple[Process, str]:
        port = free_port()
        bare = self.start("bare", ["-m", "bench.bare", str(port)])
        await wait_for_port(bare, port)
        return bare, f"http://127.0.0.1:{port}"

    def start_worker(self, worker: str) -> Process:
        return self.start(f"worker-{worker}", ["-m", "workers", worker])

    def stop(self, process: Process) -> None:
        process.stop()
        self.processes.remove(process)

    async def close(self) -> None:
        """Stop every process and delete every key, queue, exchange and table of the run."""
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()
        with contextlib.suppress(Exception):
            await self._delete_keys()
        with contextlib.suppress(Exception):
            await self._delete_topology()
        with contextlib.suppress(Exception):
            await self._drop_table()
        await self.redis.aclose()

    async def queue_depths(self, *, purge: bool = False) -> dict[str, int]:
        """Messages waiting in each worker queue (and emptied when purge)."""
        topology = Topology.from_settings(self.settings)
        depths = {}
        connection = await aio_pika.connect(self.settings.amqp_url, timeout=10)
        async with connection:
            channel = await connection.channel()
            for worker in WORKERS:
                queue = await channel.declare_queue(topology.queue(worker), passive=True)
                depths[worker] = queue.declaration_result.message_count or 0
                if purge:
                    await queue.purge()
        return depths

    async def outbox_length(self) -> int:
        return await backlog(self.redis, self.keys)

    async def expiry_size(self) -> int:
        """Sessions in the expiry index, over every bucket."""
        pipe = self.redis.pipeline(transaction=False)
        for bucket in range(BUCKETS):
            pipe.zcard(self.keys.expiry(bucket))
        return sum(int(n) for n in await pipe.execute())

    async def outbox_empty(self) -> bool:
        return await self.outbox_length() == 0

    async def count_keys(self, pattern: str) -> int:
        n = 0
        async for _ in self.redis.scan_iter(match=self.keys.prefix + pattern, count=5000):
            n += 1
        return n

    async def _delete_keys(self) -> None:
        batch: list[str] = []
        async for key in self.redis.scan_iter(match=f"{self.keys.prefix}*", count=5000):
            batch.append(key)
            if len(batch) >= 5000:
                await self.redis.unlink(*batch)
                batch.clear()
        if batch:
            await self.redis.unlink(*batch)

    async def _delete_topology(self) -> None:
        topology = Topology.from_settings(self.settings)
        connection = await aio_pika.connect(self.settings.amqp_url, timeout=10)
        async with connection:
            channel = await connection.channel()
            for worker in WORKERS:
                for name in (topology.queue(worker), topology.dead_letter_queue(worker)):
                    await channel.queue_delete(name)
            await channel.exchange_delete(topology.exchange)
            await channel.exchange_delete(topology.dead_letter_exchange)

    async def _drop_table(self) -> None:
        connection = await asyncpg.connect(self.settings.database_url, timeout=10)
        try:
            await connection.execute(f'DROP TABLE IF EXISTS "{self.settings.audit_table}"')
        finally:
            await connection.close()


async def wait_for_port(process: Process, port: int, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while True:
        process.check_alive()
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{process.name} did not listen on {port} in {within}s"
                ) from None
            await asyncio.sleep(0.1)
        else:
            writer.close()
            await writer.wait_closed()
            return


async def wait_until(
    what: str, check: Callable[[], Awaitable[bool]], within: float, interval: float = 0.05
) -> float:
    """Poll an async predicate until it holds; return the seconds it took."""
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > within:
            raise TimeoutError(f"{what}: not within {within}s")
        await asyncio.sleep(interval)
    return time.monotonic() - start
