"""The cluster tests' world: one Redis Cluster of three primaries per module (the
`cluster` fixture of tests/support/cluster.py) and, on it, the real processes with
REDIS_CLUSTER=true: the API (`python -m service`, its relay and sweeper off), a
standalone relay and sweeper (`python -m outbox relay|sweeper`), and both workers
(`python -m workers audit|push-cleanup`), started once per module on the module's own
key prefix, exchange, queues and audit table, and stopped after it.

Each test binds a queue of its own to the module's exchange (`events`) and counts what
reaches it once the outbox is empty: every entry then has been confirmed by the broker,
so the queue holds every event there will be, and the counts are exact."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import aio_pika
import pytest
from aio_pika.abc import AbstractQueue
from redis.asyncio import Redis

from session_close.events import EVENT_TYPES, SessionEvent
from session_close.keys import Keys
from session_close.redis_client import connect_redis
from session_close.settings import Settings
from tests.support.cluster import Cluster, clean_up, cluster, cluster_settings, outbox_length
from tests.support.processes import listening_port, log_tail, running, settings_env
from tests.support.waiting import wait_until, wait_until_blocking

# The module-scoped fixture, for every test here.
__all__ = ["cluster"]

OUTBOX_PROCESSES = ("relay", "sweeper")
WORKER_PROCESSES = ("audit", "push-cleanup")


@dataclass
class Stack:
    settings: Settings
    api_port: int
    # The metrics ports of the standalone relay and sweeper.
    metrics_ports: dict[str, int]
    folder: Path
    processes: dict[str, subprocess.Popen[bytes]]

    @property
    def keys(self) -> Keys:
        return Keys(self.settings.redis_key_prefix)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.api_port}{path}"

    def log(self, name: str) -> str:
        return log_tail(self.folder / f"{name}.log")


def _logged(log: Path, proc: subprocess.Popen[bytes], message: str) -> bool:
    assert proc.poll() is None, f"{log.name} exited early:\n{log_tail(log)}"
    return log.exists() and f'"{message}"' in log.read_text(errors="replace")


@pytest.fixture(scope="module")
def stack(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The API, the relay, the sweeper and both workers on the cluster, for the module."""
    settings = cluster_settings(cluster)
    folder = tmp_path_factory.mktemp("stack")
    env = settings_env(
        settings,
        HTTP_HOST="127.0.0.1",
        HTTP_PORT="0",
        LOG_LEVEL="INFO",
        RELAY_ENABLED="false",
        SWEEPER_ENABLED="false",
        OUTBOX_METRICS_PORT="0",
    )
    assert env["REDIS_CLUSTER"] == "true"
    with ExitStack() as stack:
        stack.callback(lambda: asyncio.run(clean_up(settings)))
        processes: dict[str, subprocess.Popen[bytes]] = {}
        metrics_ports: dict[str, int] = {}
        log = folder / "api.log"
        api = stack.enter_context(running(["service"], env, log))
        processes["api"] = api
        # The API declares the topology as it starts; the workers find it declared.
        api_port = listening_port(log, api)
        for name in OUTBOX_PROCESSES:
            log = folder / f"{name}.log"
            proc = stack.enter_context(running(["outbox", name], env, log))
            processes[name] = proc
            metrics_ports[name] = listening_port(log, proc, message="serving metrics")
        for name in WORKER_PROCESSES:
            log = folder / f"{name}.log"
            proc = stack.enter_context(running(["workers", name], env, log))
            processes[name] = proc
            wait_until_blocking(
                partial(_logged, log, proc, "worker consuming"),
                f"the {name} worker to consume",
                within=30,
            )
        made = Stack(settings, api_port, metrics_ports, folder, processes)
        yield made
        for name, proc in processes.items():
            assert proc.poll() is None, f"{name} died:\n{made.log(name)}"


@pytest.fixture
async def redis(stack: Stack) -> AsyncIterator[Redis]:
    """The cluster client every process uses (REDIS_CLUSTER=true), on the module's prefix."""
    client = connect_redis(stack.settings)
    yield client
    await client.aclose()


class Events:
    """A queue of the test's own, bound to the module's exchange for every event type."""

    def __init__(self, queue: AbstractQueue) -> None:
        self._queue = queue
        self.received: list[SessionEvent] = []

    async def take(self) -> None:
        while (message := await self._queue.get(fail=False, no_ack=True)) is not None:
            self.received.append(SessionEvent.decode(message.body))

    async def settle(
        self, redis: Redis, keys: Keys, expected: int, *, within: float = 30.0
    ) -> list[SessionEvent]:
        """Every event that reaches the queue, once the outbox is empty and at least
        `expected` arrived (more would be a repeat: the caller's assertion counts)."""

        async def settled() -> bool:
            # Empty first, then taken: whatever was confirmed before is in the queue.
            empty = await outbox_length(redis, keys) == 0
            await self.take()
            return empty and len(self.received) >= expected

        await wait_until(settled, f"{expected} events and an empty outbox", within=within)
        return self.received

    def count(self, event_type: str) -> Counter[str]:
        """How often each session got an event of this type."""
        return Counter(e.session_id for e in self.received if e.type == event_type)


@pytest.fixture
async def events(stack: Stack) -> AsyncIterator[Events]:
    settings = stack.settings
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(settings.amqp_exchange, ensure=True)
        queue = await channel.declare_queue(
            f"{settings.amqp_queue_prefix}test-{uuid.uuid4().hex[:8]}", exclusive=True
        )
        for routing_key in EVENT_TYPES:
            await queue.bind(exchange, routing_key)
        yield Events(queue)
