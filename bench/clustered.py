"""A close on Redis Cluster: the same close run as the single node's, against a cluster
of three primaries of the run's own (redis-servers on free ports, no persistence), with
REDIS_CLUSTER=true. Every process the run starts (the API and its relay) talks to it."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from redis import Redis as SyncRedis

from bench.seed import seed_tokens
from bench.stack import Stack, free_port, wait_for_port
from bench.wrk import WrkResult

PRIMARIES = 3
READY_TIMEOUT_SECONDS = 30.0


def cluster_ports(count: int) -> list[int]:
    """Free ports whose cluster bus port (port + 10000) is free too."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port + 10000 <= 65535 and port not in ports and _free(port + 10000):
            ports.append(port)
    return ports


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def redis_cluster(workdir: Path, primaries: int = PRIMARIES) -> Iterator[list[int]]:
    """Primaries with no replica, the slots spread over them by `redis-cli --cluster
    create`; stopped on the way out (their files in a temporary directory, their logs in
    `workdir`). Yields the nodes' ports."""
    ports = cluster_ports(primaries)
    procs: list[subprocess.Popen[bytes]] = []
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(_stop, procs)
        data = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="bench-cluster-")))
        for port in ports:
            args = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(data)]
            args += ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf"]
            args += ["--appendonly", "no", "--save", "", "--maxmemory-policy", "noeviction"]
            with open(workdir / f"redis-cluster-{port}.log", "ab") as log:
                procs.append(subprocess.Popen(["redis-server", *args], stdout=log, stderr=log))
        _wait(lambda: all(_answers(port) for port in ports), procs, "the nodes to start")
        nodes = [f"127.0.0.1:{port}" for port in ports]
        create = ["redis-cli", "--cluster", "create", *nodes, "--cluster-replicas", "0"]
        subprocess.run([*create, "--cluster-yes"], check=True, capture_output=True)
        _wait(lambda: all(_cluster_ok(port) for port in ports), procs, "the cluster to be ok")
        yield ports


def _answers(port: int) -> bool:
    with contextlib.suppress(Exception), SyncRedis(port=port, socket_timeout=1) as node:
        return bool(node.ping())
    return False


def _cluster_ok(port: int) -> bool:
    with contextlib.suppress(Exception), SyncRedis(port=port, socket_timeout=1) as node:
        return b"cluster_state:ok" in node.execute_command("CLUSTER", "INFO")
    return False


def _wait(ready: Callable[[], bool], procs: list[subprocess.Popen[bytes]], what: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while not ready():
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.kill()
        proc.wait(10)


async def measure(stack: Stack, seconds: float, connections: int) -> WrkResult:
    """The close run (relay in the API) on a cluster of the run's own."""
    from bench.load import measure_close

    with redis_cluster(stack.workdir) as ports:
        url = f"redis://127.0.0.1:{ports[0]}/0"
        own = Stack(
            dataclasses.replace(stack.settings, redis_url=url, redis_cluster=True), stack.workdir
        )
        try:
            await seed_tokens(own.redis, own.keys, own.run_id)
            api = own.start("api-cluster", ["-m", "service"], own.env())
            await wait_for_port(api, own.settings.http_port)
            result, _, _ = await measure_close(own, api, seconds, connections, None, 1)
            own.stop(api)
            return result
        finally:
            await own.close()
