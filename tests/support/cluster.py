"""A Redis Cluster of the tests' own: three primaries (no replicas) on free ports, made
with `redis-cli --cluster create`, ready once every node says `cluster_state:ok`, and
SIGKILLed on the way out (nothing is persisted: no AOF, no RDB; the node files are in
the fixture's temporary folder). The machine's shared Redis is never touched.

`cluster` is a module-scoped fixture: one cluster per test module (tests/cluster/
conftest.py makes it available there). `cluster_settings` gives settings on it with
names of their own (key prefix, exchange, queues, audit table), `clean_up` removes
what they named on RabbitMQ and PostgreSQL."""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from session_close.keys import Keys
from session_close.settings import Settings
from session_close.topology import WORKERS, Topology
from tests.support.processes import free_port
from tests.support.waiting import wait_until_blocking

PRIMARIES = 3
# What Redis adds to a node's port for its cluster bus.
BUS_OFFSET = 10000
SLOTS = 16384
# A port found free may be taken (say, as the source port of another process's
# connection) before redis-server binds it: the nodes then start again on other ports.
START_ATTEMPTS = 3


@dataclass
class Cluster:
    ports: list[int]
    folder: Path
    processes: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    # (first slot, last slot, port of the primary serving them), from CLUSTER SLOTS.
    slot_ranges: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def url(self) -> str:
        """REDIS_URL for the processes under test: one node; the client finds the rest."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def env(self) -> dict[str, str]:
        """The variables that point a process at this cluster."""
        return {"REDIS_URL": self.url, "REDIS_CLUSTER": "true"}

    def client(self, port: int) -> SyncRedis:
        """A plain client of the one node on `port` (to look at what it holds)."""
        return SyncRedis(port=port, socket_timeout=5, decode_responses=True)

    def node_of(self, key: str) -> int:
        """The port of the primary that holds `key`: its slot (CLUSTER KEYSLOT, as Redis
        computes it) in the slot map."""
        with self.client(self.ports[0]) as node:
            slot = int(node.execute_command("CLUSTER KEYSLOT", key))
        for first, last, port in self.slot_ranges:
            if first <= slot <= last:
                return port
        raise AssertionError(f"slot {slot} of {key!r} is served by no node")

    def users_on_every_node(self, keys: Keys, name: str, count: int) -> list[str]:
        """`count` user ids `<name>-<run>-<n>` whose keys are spread evenly over every
        primary (chosen, not left to chance: 12 random users miss a primary 2 % of the
        time)."""
        run, per_node = uuid.uuid4().hex[:6], -(-count // len(self.ports))
        taken: dict[int, int] = dict.fromkeys(self.ports, 0)
        users: list[str] = []
        n = 0
        while len(users) < count:
            user = f"{name}-{run}-{n:03d}"
            node = self.node_of(keys.user_sessions(user))
            if taken[node] < per_node:
                taken[node] += 1
                users.append(user)
            n += 1
        return users

    def keys_on(self, port: int, match: str) -> list[str]:
        """The keys matching `match` that the node on `port` holds (SCAN on that node)."""
        with self.client(port) as node:
            return sorted(node.scan_iter(match=match, count=1000))

    def keys_by_node(self, match: str) -> dict[int, list[str]]:
        return {port: self.keys_on(port, match) for port in self.ports}

    def snapshot(self, *matches: str) -> dict[str, Any]:
        """Every key matching one of `matches`, on every node, with its type and content
        (a stream: its last id)."""
        state: dict[str, Any] = {}
        for port in self.ports:
            with self.client(port) as node:
                for match in matches:
                    for key in node.scan_iter(match=match, count=1000):
                        state[key] = _content(node, key)
        return state


def _content(node: SyncRedis, key: str) -> tuple[str, Any]:
    kind = str(node.type(key))
    value: Any
    if kind == "hash":
        value = node.hgetall(key)
    elif kind == "set":
        value = sorted(node.smembers(key))
    elif kind == "zset":
        value = node.zrange(key, 0, -1, withscores=True)
    elif kind == "string":
        value = node.get(key)
    elif kind == "stream":
        value = node.xinfo_stream(key)["last-generated-id"]
    else:
        value = None
    return kind, value


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def cluster_port(taken: set[int]) -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    for _ in range(200):
        port = free_port()
        if port not in taken and port + BUS_OFFSET <= 65535 and _bindable(port + BUS_OFFSET):
            return port
    raise RuntimeError("no free port pair for a cluster node")


class PortTaken(Exception):
    """A node could not bind its port or its bus port: something took it meanwhile."""


def _alive(cluster: Cluster) -> None:
    for port, proc in cluster.processes.items():
        if proc.poll() is not None:
            log = (cluster.folder / f"node-{port}.log").read_text(errors="replace")
            if "Address already in use" in log:
                raise PortTaken(log)
            raise AssertionError(f"redis-server on {port} exited with {proc.returncode}:\n{log}")


def _answers(cluster: Cluster, port: int) -> bool:
    _alive(cluster)
    # One quick try: a port another process holds must not hold the wait for long.
    quick = SyncRedis(port=port, socket_timeout=1, retry=Retry(NoBackoff(), 0))
    try:
        with quick:
            return bool(quick.ping())
    except Exception:  # refused, LOADING: not yet
        return False


def _state_ok(cluster: Cluster, port: int) -> bool:
    _alive(cluster)
    with cluster.client(port) as node:
        info = node.execute_command("CLUSTER INFO")
    # redis-py parses CLUSTER INFO into a dict; the raw reply is "field:value" lines.
    state = info.get("cluster_state") if isinstance(info, dict) else None
    if state is None:
        state = dict(line.split(":", 1) for line in str(info).split() if ":" in line).get(
            "cluster_state"
        )
    return state == "ok"


def _slot_ranges(cluster: Cluster) -> list[tuple[int, int, int]]:
    with cluster.client(cluster.ports[0]) as node:
        reply = node.execute_command("CLUSTER SLOTS")
    ranges: list[tuple[int, int, int]] = []
    # redis-py gives {(first, last): {"primary": (host, port), ...}}; raw: nested lists.
    if isinstance(reply, dict):
        for (first, last), nodes in reply.items():
            ranges.append((int(first), int(last), int(nodes["primary"][1])))
    else:
        for first, last, primary, *_ in reply:
            ranges.append((int(first), int(last), int(primary[1])))
    return sorted(ranges)


def _kill_all(cluster: Cluster) -> None:
    # SIGKILL: nothing to save, and nothing left behind.
    for proc in cluster.processes.values():
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def _start_nodes(cluster: Cluster) -> None:
    """Start every node and wait until each answers; PortTaken if one could not bind."""
    for port in cluster.ports:
        with open(cluster.folder / f"node-{port}.log", "ab") as log:
            cluster.processes[port] = subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(cluster.folder / f"nodes-{port}.conf"),
                    "--appendonly",
                    "no",
                    "--save",
                    "",
                    "--dir",
                    str(cluster.folder),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
    for port in cluster.ports:
        wait_until_blocking(partial(_answers, cluster, port), f"redis-server on {port}", within=30)


@contextmanager
def redis_cluster(folder: Path) -> Iterator[Cluster]:
    """Three cluster-enabled redis-servers joined into one cluster, every slot served."""
    with ExitStack() as stack:
        for attempt in range(1, START_ATTEMPTS + 1):
            ports: list[int] = []
            for _ in range(PRIMARIES):
                ports.append(cluster_port(set(ports) | {p + BUS_OFFSET for p in ports}))
            cluster = Cluster(ports, folder)
            stack.callback(_kill_all, cluster)
            try:
                _start_nodes(cluster)
                break
            except PortTaken:
                _kill_all(cluster)
                if attempt == START_ATTEMPTS:
                    raise
        created = subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{port}" for port in ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert created.returncode == 0, created.stdout.decode() + created.stderr.decode()
        for port in ports:
            wait_until_blocking(
                partial(_state_ok, cluster, port),
                f"cluster_state:ok on {port}",
                within=30,
                step=0.05,
            )
        cluster.slot_ranges = _slot_ranges(cluster)
        served = sum(last - first + 1 for first, last, _ in cluster.slot_ranges)
        assert served == SLOTS, cluster.slot_ranges
        assert {port for *_, port in cluster.slot_ranges} == set(ports)
        yield cluster


def cluster_settings(cluster: Cluster) -> Settings:
    """Settings on the cluster, with names of their own (prefix, exchange, queues, table)."""
    test_id = uuid.uuid4().hex[:10]
    return dataclasses.replace(
        Settings.from_env(),
        redis_url=cluster.url,
        redis_cluster=True,
        redis_key_prefix=f"test:{test_id}:",
        amqp_exchange=f"test.{test_id}.sessions",
        amqp_queue_prefix=f"test.{test_id}.",
        audit_table=f"audit_{test_id}",
        # A confirm slowed by a busy machine must not become a repeat: the tests count.
        publish_timeout_seconds=5.0,
        sweep_interval_seconds=0.2,
    )


async def outbox_length(redis: Redis, keys: Keys) -> int:
    """Entries in every bucket's outbox (read, being published, or waiting)."""
    pipe = redis.pipeline(transaction=False)
    for outbox in keys.outboxes:
        pipe.xlen(outbox)
    return sum(int(n) for n in await pipe.execute())


async def clean_up(settings: Settings) -> None:
    """Remove the exchanges, queues and audit table of these settings."""
    topology = Topology.from_settings(settings)
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        for worker in WORKERS:
            for name in (topology.queue(worker), topology.dead_letter_queue(worker)):
                await channel.queue_delete(name)
        await channel.exchange_delete(topology.exchange)
        await channel.exchange_delete(topology.dead_letter_exchange)
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute(f'DROP TABLE IF EXISTS "{settings.audit_table}"')
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A Redis Cluster of three primaries for the test module, killed after it."""
    with redis_cluster(tmp_path_factory.mktemp("cluster")) as made:
        yield made
