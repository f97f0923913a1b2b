"""Fault suite, Redis side: the primary is lost (SIGKILL) behind Redis Sentinel, with
REDIS_MIN_REPLICAS=1. Real processes: the API (`python -m service`, relay inside), the
push-cleanup worker, `sessionctl`, a primary, two replicas and three Sentinels of the
test's own (tests/support/sentinel.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import aiohttp
import pytest
from aio_pika.abc import AbstractIncomingMessage
from redis.asyncio import Redis
from redis.exceptions import RedisError

from outbox.stream import backlog
from session_close.cli import create_session, create_token
from session_close.keys import OUTBOX_GROUP, Keys, bucket_of
from session_close.redis_client import connect_redis
from session_close.settings import Settings
from session_close.topology import Topology
from tests.fault.test_api_faults import topology_declared
from tests.support.processes import listening_port, log_tail, running, settings_env
from tests.support.sentinel import MASTER, ReplicatedRedis, replicated_redis
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.fault, pytest.mark.timeout(300)]

USER = "failover-user"
TOKEN = "failover-token"
HEADERS = {
    "Content-Type": "application/json",
    "OS": "Android",
    "AppVersion": "1.0.10",
    "Authorization": f"Basic {TOKEN}",
}
WARM_UP = 10
# A client's pause after a 503 before it tries again (it would honour Retry-After).
CLIENT_PAUSE = 0.2
# Every close settles (success or "already closed") within this long of the kill.
SETTLE_SECONDS = 90.0


@dataclass(frozen=True)
class Attempt:
    session_id: str
    status: int  # 0: the client gave up waiting (never expected)
    type: str
    started: float
    seconds: float


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ReplicatedRedis]:
    with replicated_redis(tmp_path) as replicated:
        yield replicated


@pytest.fixture
def failover_settings(settings: Settings, cluster: ReplicatedRedis) -> Settings:
    return dataclasses.replace(
        settings,
        redis_url=cluster.env()["REDIS_URL"],
        redis_sentinels=cluster.sentinels,
        redis_sentinel_master=MASTER,
        redis_min_replicas=1,
        redis_replica_timeout_seconds=0.5,
    )


@pytest.fixture
async def store(failover_settings: Settings) -> AsyncIterator[Redis]:
    """The test's own client, through the Sentinels like the processes under test."""
    client = connect_redis(failover_settings)
    yield client
    await client.aclose()


@pytest.fixture
def api_env(failover_settings: Settings) -> dict[str, str]:
    return settings_env(
        failover_settings,
        HTTP_HOST="127.0.0.1",
        HTTP_PORT="0",
        LOG_LEVEL="INFO",
        PUBLISH_TIMEOUT_SECONDS="5",
    )


async def seed(store: Redis, keys: Keys, n: int, *, push: bool = False) -> list[str]:
    """`n` open sessions of USER (each with a push token if `push`), held by both replicas."""
    await create_token(store, keys, USER, TOKEN, 3600)
    sids = [f"failover-session-{i:04d}" for i in range(n)]
    for sid in sids:
        token = f"push-{sid}" if push else ""
        await create_session(store, keys, USER, sid, ttl=3600, push_token=token)
    # WAIT counts the writes of its own connection: a write on the same one first.
    async with store.pipeline(transaction=False) as pipe:
        pipe.set(f"{keys.prefix}seeded", "1")
        pipe.execute_command("WAIT", 2, 20000)
        _, replicas = await pipe.execute()
    assert replicas == 2
    return sids


class Events:
    """Every event that reaches the audit queue: (event id, session id) per delivery."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.deliveries: list[tuple[str, str]] = []
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None

    async def start(self) -> None:
        self._connection = await aio_pika.connect_robust(self._settings.amqp_url)
        channel = await self._connection.channel()
        queue = await channel.get_queue(Topology.from_settings(self._settings).queue("audit"))
        await queue.consume(self._take, no_ack=True)

    async def _take(self, message: AbstractIncomingMessage) -> None:
        body = json.loads(message.body)
        self.deliveries.append((message.message_id or "", body["data"]["sessionId"]))

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()

    def ids_by_session(self) -> dict[str, set[str]]:
        found: dict[str, set[str]] = {}
        for event_id, sid in self.deliveries:
            found.setdefault(sid, set()).add(event_id)
        return found

    @property
    def duplicates(self) -> int:
        """Deliveries of an event id already delivered (at least once allows them)."""
        return sum(n - 1 for n in Counter(e for e, _ in self.deliveries).values())


@pytest.fixture
async def events(failover_settings: Settings, amqp_cleanup: None) -> AsyncIterator[Events]:
    collected = Events(failover_settings)
    yield collected
    await collected.close()


class Client:
    """Closes through the API and records every attempt."""

    def __init__(self, http: aiohttp.ClientSession, port: int) -> None:
        self._http = http
        self._url = f"http://127.0.0.1:{port}/v1.0/session/close"
        self.attempts: list[Attempt] = []

    async def close(self, sid: str) -> Attempt:
        started = time.monotonic()
        try:
            async with self._http.post(
                self._url, headers={**HEADERS, "SessionID": sid}, data=b'{"requestContent": {}}'
            ) as resp:
                body = await resp.json()
                attempt = Attempt(
                    sid, resp.status, body["info"]["type"], started, time.monotonic() - started
                )
        except (TimeoutError, aiohttp.ClientError):
            attempt = Attempt(sid, 0, "", started, time.monotonic() - started)
        self.attempts.append(attempt)
        return attempt

    async def close_until_settled(self, sid: str, deadline: float) -> Attempt:
        """Try again after every 503 (as an app would), until a final answer."""
        while True:
            attempt = await self.close(sid)
            if attempt.status not in (0, 503) or time.monotonic() > deadline:
                return attempt
            await asyncio.sleep(CLIENT_PAUSE)  # the client's back-off, not a wait for state

    async def close_many(
        self, sids: list[str], deadline: float, concurrency: int = 6, pause: float = 0.0
    ) -> list[Attempt]:
        todo = list(reversed(sids))
        finals: list[Attempt] = []

        async def one_client() -> None:
            while todo:
                finals.append(await self.close_until_settled(todo.pop(), deadline))
                if pause:
                    await asyncio.sleep(pause)  # pacing the load, not waiting for a state

        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        return finals


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        yield session


async def started_api(settings: Settings, log: Path, api: subprocess.Popen[bytes]) -> int:
    port = listening_port(log, api)
    await topology_declared(settings)
    return port


async def drained(store: Redis, keys: Keys) -> bool:
    try:
        return int(await backlog(store, keys)) == 0
    except (RedisError, OSError):
        return False  # a failover in progress


async def retried_by_relay(store: Redis, keys: Keys, n: int) -> bool:
    """The outbox still holds the `n` entries, and the relay read what it holds of them
    at least twice: it read them, did not publish them (it would have deleted them), and
    read them again."""
    pending = await store.xpending_range(keys.outbox(bucket_of(USER)), OUTBOX_GROUP, "-", "+", n)
    held = [int(p["times_delivered"]) for p in pending]
    return int(await backlog(store, keys)) == n and bool(held) and min(held) >= 2


async def test_primary_sigkilled_under_closes_loses_no_acknowledged_close(
    failover_settings: Settings,
    cluster: ReplicatedRedis,
    store: Redis,
    keys: Keys,
    api_env: dict[str, str],
    events: Events,
    http: aiohttp.ClientSession,
    report_counts: Callable[..., None],
    tmp_path: Path,
) -> None:
    """(a) Every close that answered success has exactly one event delivered; no 500."""
    sids = await seed(store, keys, WARM_UP + 400)
    warm_up, load = sids[:WARM_UP], sids[WARM_UP:]
    log = tmp_path / "api.log"
    with running(["service"], api_env, log) as api:
        port = await started_api(failover_settings, log, api)
        await events.start()
        client = Client(http, port)
        assert [(await client.close(sid)).type for sid in warm_up] == ["success"] * WARM_UP
        deadline = time.monotonic() + SETTLE_SECONDS
        loading = asyncio.ensure_future(client.close_many(load, deadline, pause=0.02))

        def succeeded() -> int:
            return sum(a.type == "success" for a in client.attempts) - WARM_UP

        await wait_until(lambda: succeeded() >= 100 or loading.done(), "100 closes", within=60)
        assert not loading.done(), "the load ended before the kill"
        killed = time.monotonic()
        cluster.kill(cluster.primary_port)
        finals = await loading
        await wait_until(
            lambda: len(events.ids_by_session()) >= len(sids),
            "an event for every session",
            within=90,
            step=0.1,
        )
        await wait_until(lambda: drained(store, keys), "the outbox to drain", within=60)
        await wait_until(
            lambda: _queue_empty(failover_settings), "the audit queue to be read", within=30
        )
        api_log = log_tail(log)
    attempts = client.attempts
    statuses = Counter(a.status for a in attempts)
    after_kill = [a for a in attempts if a.started >= killed and a.type == "success"]
    recovered = min(a.started + a.seconds for a in after_kill) - killed if after_kill else -1
    ids = events.ids_by_session()
    acknowledged = {a.session_id for a in attempts if a.type == "success"}
    lost = [sid for sid in acknowledged if sid not in ids]
    doubled = [sid for sid, found in ids.items() if len(found) > 1]
    report_counts(
        sent=len(attempts),
        succeeded=len(acknowledged),
        already_closed=sum(a.type == "info" for a in finals),
        unavailable_503=statuses[503],
        events_delivered=len(events.deliveries),
        sessions_with_an_event=len(ids),
        lost=len(lost),
        sessions_with_two_events=len(doubled),
        duplicates=events.duplicates,
        seconds_kill_to_first_success=round(recovered, 2),
        slowest_503_seconds=round(max(a.seconds for a in attempts if a.status == 503), 2),
    )
    assert set(statuses) <= {200, 503}, (statuses, api_log)
    assert {a.type for a in finals} <= {"success", "info"}, api_log
    assert statuses[503] > 0, "the kill was not felt"
    # Every session closed exactly once: one event each, acknowledged ones included.
    assert lost == [], api_log
    assert doubled == [], api_log
    assert set(ids) == set(sids)
    assert 0 < recovered <= 30, api_log
    # Never a wait past REDIS_TIMEOUT_SECONDS + REDIS_REPLICA_TIMEOUT_SECONDS (with
    # room for HTTP on a loaded machine).
    bound = (
        failover_settings.redis_timeout_seconds + failover_settings.redis_replica_timeout_seconds
    )
    assert max(a.seconds for a in attempts if a.status == 503) <= bound + 2.5


async def test_stalled_replicas_never_acknowledge_and_the_promoted_replica_holds_every_success(
    failover_settings: Settings,
    cluster: ReplicatedRedis,
    store: Redis,
    keys: Keys,
    api_env: dict[str, str],
    events: Events,
    http: aiohttp.ClientSession,
    report_counts: Callable[..., None],
    tmp_path: Path,
) -> None:
    """(b) With the replicas' link stalled, closes answer 503, never success; after the
    primary is killed, no success is missing on the promoted replica, and each session
    has one event (the relay never published what the replicas lacked)."""
    sids = await seed(store, keys, WARM_UP + 60)
    warm_up, stalled = sids[:WARM_UP], sids[WARM_UP:]
    log = tmp_path / "api.log"
    with running(["service"], api_env, log) as api:
        port = await started_api(failover_settings, log, api)
        await events.start()
        client = Client(http, port)
        assert [(await client.close(sid)).type for sid in warm_up] == ["success"] * WARM_UP
        await wait_until(lambda: drained(store, keys), "the warm-up to be published", within=30)
        cluster.proxy.cut("silent")
        during_stall = await asyncio.gather(*(client.close(sid) for sid in stalled))
        await wait_until(
            lambda: retried_by_relay(store, keys, len(stalled)),
            "the relay to hold the entries the replicas lack, and retry them",
            within=30,
            step=0.1,
        )
        killed = time.monotonic()
        cluster.kill(cluster.primary_port)
        promoted = await asyncio.to_thread(cluster.wait_for_failover)
        finals = await client.close_many(stalled, time.monotonic() + SETTLE_SECONDS)
        await wait_until(
            lambda: len(events.ids_by_session()) >= len(sids),
            "an event for every session",
            within=60,
            step=0.1,
        )
        await wait_until(lambda: drained(store, keys), "the outbox to drain", within=60)
        api_log = log_tail(log)
    after_kill = [a for a in client.attempts if a.started >= killed]
    succeeded_after = {a.session_id for a in after_kill if a.type == "success"}
    recovered = min(a.started + a.seconds for a in after_kill if a.type == "success")
    with cluster.client(promoted) as node:
        missing = [sid for sid in sids if not node.exists(keys.tombstone(USER, sid))]
    ids = events.ids_by_session()
    doubled = [sid for sid, found in ids.items() if len(found) > 1]
    report_counts(
        sent_during_stall=len(during_stall),
        succeeded_during_stall=sum(a.type == "success" for a in during_stall),
        unavailable_503_during_stall=sum(a.status == 503 for a in during_stall),
        sent_after_kill=len(after_kill),
        succeeded_after_kill=len(succeeded_after),
        unavailable_503_after_kill=sum(a.status == 503 for a in after_kill),
        missing_on_promoted=len(missing),
        events_delivered=len(events.deliveries),
        sessions_with_two_events=len(doubled),
        duplicates=events.duplicates,
        seconds_kill_to_first_success=round(recovered - killed, 2),
    )
    assert [a.status for a in during_stall] == [503] * len(stalled), api_log
    assert {a.type for a in finals} == {"success"}, api_log
    assert succeeded_after == set(stalled)
    assert missing == [], api_log
    assert doubled == [], api_log
    assert set(ids) == set(sids), api_log


async def test_relay_and_push_cleanup_follow_a_failover_without_a_restart(
    failover_settings: Settings,
    cluster: ReplicatedRedis,
    store: Redis,
    keys: Keys,
    api_env: dict[str, str],
    events: Events,
    http: aiohttp.ClientSession,
    report_counts: Callable[..., None],
    tmp_path: Path,
) -> None:
    """(c) After a failover the relay drains the outbox, the push-cleanup worker removes
    the closed sessions' push tokens and sessionctl reads the new primary, none of them
    restarted."""
    sids = await seed(store, keys, 40, push=True)
    before, after = sids[:20], sids[20:]

    async def tokens_of(closed: list[str]) -> int:
        try:
            mapped = set((await store.hgetall(keys.user_push(USER))).values())
        except (RedisError, OSError):
            return -1  # a failover in progress
        return len(mapped & set(closed))

    async def none_left(closed: list[str]) -> bool:
        return await tokens_of(closed) == 0

    with (
        running(["service"], api_env, tmp_path / "api.log") as api,
        running(["workers", "push-cleanup"], api_env, tmp_path / "worker.log") as worker,
    ):
        port = await started_api(failover_settings, tmp_path / "api.log", api)
        await events.start()
        client = Client(http, port)
        first = await client.close_many(before, time.monotonic() + 60)
        await wait_until(lambda: none_left(before), "the worker to remove tokens", within=60)
        killed = time.monotonic()
        cluster.kill(cluster.primary_port)
        await asyncio.to_thread(cluster.wait_for_failover)
        failover_seconds = time.monotonic() - killed
        second = await client.close_many(after, time.monotonic() + SETTLE_SECONDS)
        await wait_until(lambda: drained(store, keys), "the relay to drain the outbox", within=60)
        await wait_until(
            lambda: none_left(after), "the worker to remove tokens after the failover", within=60
        )
        sessionctl = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "session_close.cli", "sessions", "--user", USER),
            env=api_env,
            stdout=asyncio.subprocess.PIPE,
        )
        listed, _ = await asyncio.wait_for(sessionctl.communicate(), 60)
        assert api.poll() is None, log_tail(tmp_path / "api.log")
        assert worker.poll() is None, log_tail(tmp_path / "worker.log")
    report_counts(
        closed_before=sum(a.type == "success" for a in first),
        closed_after=sum(a.type == "success" for a in second),
        failover_seconds=round(failover_seconds, 2),
        tokens_left=await tokens_of(sids),
        outbox_left=int(await backlog(store, keys)),
        events_delivered=len(events.deliveries),
    )
    assert [a.type for a in first + second] == ["success"] * len(sids)
    assert json.loads(listed)["sessions"] == []


async def _queue_empty(settings: Settings) -> bool:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(
            Topology.from_settings(settings).queue("audit"), passive=True
        )
        return queue.declaration_result.message_count == 0
