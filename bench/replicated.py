"""The cost of REDIS_MIN_REPLICAS: the same close run against a primary with one local
replica (redis-servers of the run's own, AOF on, on free ports), first with
REDIS_MIN_REPLICAS=0 and then with 1, so that the two rows differ only in the WAIT."""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from redis import Redis as SyncRedis

from bench.seed import seed_tokens
from bench.stack import Stack, free_port, wait_for_port
from bench.wrk import WrkResult

SYNC_TIMEOUT_SECONDS = 30.0


@contextlib.contextmanager
def primary_with_replica(workdir: Path) -> Iterator[str]:
    """A primary and its replica, both stopped on the way out (their data in a temporary
    directory, their logs in `workdir`); the primary's URL."""
    procs: list[subprocess.Popen[bytes]] = []
    ports = [free_port(), free_port()]
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(_stop, procs)
        data = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="bench-redis-")))
        for role, port in zip(("primary", "replica"), ports, strict=True):
            folder = data / role
            folder.mkdir()
            args = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder)]
            args += ["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]
            args += ["--maxmemory-policy", "noeviction"]
            if role == "replica":
                args += ["--replicaof", f"127.0.0.1 {ports[0]}"]
            with open(workdir / f"redis-{role}.log", "ab") as log:
                procs.append(subprocess.Popen(["redis-server", *args], stdout=log, stderr=log))
        _wait_synced(ports[1], procs)
        yield f"redis://127.0.0.1:{ports[0]}/0"


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.terminate()
        proc.wait(10)


def _wait_synced(replica: int, procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + SYNC_TIMEOUT_SECONDS
    while True:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {proc.returncode}")
        with contextlib.suppress(Exception), SyncRedis(port=replica, socket_timeout=1) as node:
            if node.info("replication").get("master_link_status") == "up":
                return
        if time.monotonic() > deadline:
            raise TimeoutError("the bench's replica did not sync")
        time.sleep(0.1)


async def measure(stack: Stack, seconds: float, connections: int) -> tuple[WrkResult, WrkResult]:
    """(REDIS_MIN_REPLICAS=0, REDIS_MIN_REPLICAS=1) on the same primary and replica."""
    from bench.load import measure_close

    with primary_with_replica(stack.workdir) as url:
        own = Stack(dataclasses.replace(stack.settings, redis_url=url), stack.workdir)
        try:
            await seed_tokens(own.redis, own.keys, own.run_id)
            first = 1
            results = []
            for replicas in ("0", "1"):
                api = own.start(
                    f"api-min-replicas-{replicas}",
                    ["-m", "service"],
                    own.env({"REDIS_MIN_REPLICAS": replicas}),
                )
                await wait_for_port(api, own.settings.http_port)
                result, first, _ = await measure_close(own, api, seconds, connections, None, first)
                own.stop(api)
                results.append(result)
        finally:
            await own.close()
    return results[0], results[1]
