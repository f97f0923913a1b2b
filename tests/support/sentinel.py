"""A replicated Redis of the test's own, for failover tests: a primary (AOF on), two
replicas whose replication links run through one TcpProxy (so a test can stall them),
and three Sentinels watching the primary as `sessions`, all on free ports, all stopped
on the way out. The machine's shared Redis is never touched."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from redis import Redis as SyncRedis

from tests.support.processes import free_port
from tests.support.proxy import TcpProxy
from tests.support.waiting import wait_until_blocking

MASTER = "sessions"
# Quick to notice a dead primary; a failover-timeout long enough that Sentinel never
# "fixes" the replicas that reach the primary through the proxy during a test (it
# repoints a replica whose master address differs after 2x this).
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 60000


@dataclass
class ReplicatedRedis:
    primary_port: int
    replica_ports: list[int]
    sentinel_ports: list[int]
    proxy: TcpProxy
    processes: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def sentinels(self) -> str:
        """REDIS_SENTINELS for the processes under test."""
        return ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)

    def env(self) -> dict[str, str]:
        """The variables that point a process at this Redis through its Sentinels (the
        URL's host is ignored then; it names a port nothing listens on, to show it)."""
        return {
            "REDIS_SENTINELS": self.sentinels,
            "REDIS_SENTINEL_MASTER": MASTER,
            "REDIS_URL": "redis://127.0.0.1:1/0",
        }

    def kill(self, port: int) -> None:
        """SIGKILL the node on `port`: no shutdown, no last AOF write."""
        proc = self.processes[port]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def wait_for_failover(self, within: float = 60.0) -> int:
        """Wait until every Sentinel names a new primary that takes writes; its port."""
        old = self.primary_port

        def switched() -> bool:
            try:
                seen = {self._master_of(port) for port in self.sentinel_ports}
                if len(seen) != 1 or old in seen:
                    return False
                with _client(seen.pop()) as node:
                    return bool(node.info("replication")["role"] == "master")
            except OSError:
                return False

        wait_until_blocking(switched, "Sentinel to promote a replica", within=within, step=0.1)
        return self._master_of(self.sentinel_ports[0])

    def client(self, port: int) -> SyncRedis:
        """A client of the node on `port` (to look at what it holds)."""
        return _client(port)

    def _master_of(self, sentinel_port: int) -> int:
        with SyncRedis(port=sentinel_port, socket_timeout=2, decode_responses=True) as sentinel:
            return int(sentinel.sentinel_master(MASTER)["port"])


def _client(port: int) -> SyncRedis:
    return SyncRedis(port=port, socket_timeout=2, decode_responses=True)


def _start(tmp_path: Path, name: str, lines: list[str], *extra: str) -> subprocess.Popen[bytes]:
    folder = tmp_path / name
    folder.mkdir()
    conf = folder / f"{name}.conf"
    # Sentinel rewrites its file, so each node has a file of its own in tmp_path.
    conf.write_text("\n".join([f"dir {folder}", "bind 127.0.0.1", *lines]) + "\n")
    with open(folder / "log", "ab") as log:
        return subprocess.Popen(["redis-server", str(conf), *extra], stdout=log, stderr=log)


def _node_lines(port: int) -> list[str]:
    return [f"port {port}", "appendonly yes", "appendfsync everysec", 'save ""']


@contextmanager
def replicated_redis(tmp_path: Path) -> Iterator[ReplicatedRedis]:
    with ExitStack() as stack:
        primary = free_port()
        proxy = TcpProxy("127.0.0.1", primary).start()
        stack.callback(proxy.close)
        cluster = ReplicatedRedis(primary, [free_port(), free_port()], [], proxy)

        def stop_all() -> None:
            for proc in cluster.processes.values():
                if proc.poll() is None:
                    proc.kill()
                proc.wait(10)

        stack.callback(stop_all)
        cluster.processes[primary] = _start(tmp_path, "primary", _node_lines(primary))
        _wait_answers(primary, cluster)
        for i, port in enumerate(cluster.replica_ports):
            # The link to the primary goes through the proxy, so a test can stall it.
            lines = [*_node_lines(port), f"replicaof 127.0.0.1 {proxy.port}"]
            cluster.processes[port] = _start(tmp_path, f"replica{i}", lines)
        for port in cluster.replica_ports:
            _wait_synced(port, cluster)
        cluster.sentinel_ports = [free_port() for _ in range(3)]
        for i, port in enumerate(cluster.sentinel_ports):
            lines = [
                f"port {port}",
                f"sentinel monitor {MASTER} 127.0.0.1 {primary} 2",
                f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}",
                f"sentinel failover-timeout {MASTER} {FAILOVER_TIMEOUT_MS}",
            ]
            cluster.processes[port] = _start(tmp_path, f"sentinel{i}", lines, "--sentinel")
        for port in cluster.sentinel_ports:
            _wait_sentinel_ready(port, cluster)
        yield cluster


def _alive(cluster: ReplicatedRedis) -> None:
    for port, proc in cluster.processes.items():
        assert proc.poll() is None, f"redis-server on {port} exited with {proc.returncode}"


def _wait_answers(port: int, cluster: ReplicatedRedis) -> None:
    def answers() -> bool:
        _alive(cluster)
        try:
            with _client(port) as node:
                return bool(node.ping())
        except OSError:
            return False
        except Exception:  # LOADING and the like: not yet
            return False

    wait_until_blocking(answers, f"redis-server on {port}", within=30)


def _wait_synced(port: int, cluster: ReplicatedRedis) -> None:
    def synced() -> bool:
        _alive(cluster)
        try:
            with _client(port) as node:
                return bool(node.info("replication").get("master_link_status") == "up")
        except Exception:
            return False

    wait_until_blocking(synced, f"replica on {port} to sync", within=30)


def _wait_sentinel_ready(port: int, cluster: ReplicatedRedis) -> None:
    """Each Sentinel sees both replicas and the two other Sentinels (a failover needs a
    majority of them to agree)."""

    def ready() -> bool:
        _alive(cluster)
        try:
            with _client(port) as sentinel:
                state = sentinel.sentinel_master(MASTER)
        except Exception:
            return False
        return int(state["num-slaves"]) == 2 and int(state["num-other-sentinels"]) == 2

    wait_until_blocking(ready, f"Sentinel on {port} to see the replicas and its peers", within=60)
