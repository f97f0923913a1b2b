"""The standalone relay (`python -m outbox relay`, REDIS_CLUSTER=true) on Redis Cluster,
its guarantees (docs/events.md) held per bucket: a relay that holds entries of buckets
on all three primaries is SIGKILLed and another publishes every one of them, exactly
once, within 10 s of the kill (its heartbeat's TTL included); a bad entry is set aside
in the dead-letter stream (a slot of its own) and the rest published; an idle relay
polls every bucket."""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import aio_pika
import pytest
from redis.asyncio import Redis

from session_close.keys import (
    DEAD_LETTER_ENTRY_ID,
    DEAD_LETTER_FIELD,
    OUTBOX_GROUP,
    Keys,
    bucket_of,
)
from session_close.redis_client import connect_redis
from session_close.settings import Settings
from session_close.topology import Topology
from tests.conftest import through
from tests.support.cluster import Cluster, clean_up, cluster_settings, outbox_length
from tests.support.delivered import closed_entry, stream_entries
from tests.support.processes import listening_port, log_tail, running, settings_env
from tests.support.proxy import TcpProxy
from tests.support.waiting import wait_until

pytestmark = pytest.mark.fault

ENTRIES = 30
TAKEOVER_BOUND = 10.0


@pytest.fixture
async def settings(cluster: Cluster) -> AsyncIterator[Settings]:
    """The test's own names on the cluster, its topology declared (the relay publishes
    to the exchange; the audit queue keeps what it published), removed afterwards."""
    made = cluster_settings(cluster)
    connection = await aio_pika.connect(made.amqp_url)
    async with connection:
        await Topology.from_settings(made).declare(await connection.channel())
    yield made
    await clean_up(made)


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    client = connect_redis(settings)
    yield client
    await client.aclose()


@pytest.fixture
def amqp_proxy(settings: Settings) -> Iterator[TcpProxy]:
    parts = urlsplit(settings.amqp_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672).start()
    yield proxy
    proxy.close()


async def pending(redis: Redis, keys: Keys) -> dict[int, dict[str, int]]:
    """Entries read and not yet settled, per bucket, by consumer (buckets with none left
    out)."""
    pipe = redis.pipeline(transaction=False)
    for outbox in keys.outboxes:
        pipe.xpending(outbox, OUTBOX_GROUP)
    return {
        bucket: {c["name"]: int(c["pending"]) for c in summary["consumers"]}
        for bucket, summary in enumerate(await pipe.execute())
        if summary["pending"]
    }


async def audit_messages(settings: Settings) -> list[str]:
    """Every message id on the audit queue, taken off it."""
    ids = []
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(Topology.from_settings(settings).queue("audit"))
        while (message := await queue.get(fail=False, no_ack=True)) is not None:
            ids.append(str(message.message_id))
    return ids


async def test_entries_of_a_killed_relay_are_published_by_another_within_10_s(
    cluster: Cluster,
    settings: Settings,
    redis: Redis,
    amqp_proxy: TcpProxy,
    tmp_path: Path,
    report_counts: Callable[..., None],
) -> None:
    keys = Keys(settings.redis_key_prefix)
    env = settings_env(settings, LOG_LEVEL="INFO", OUTBOX_METRICS_PORT="0")
    doomed_env = {**env, "AMQP_URL": through(settings.amqp_url, amqp_proxy)}
    users = [f"takeover-{uuid.uuid4().hex[:6]}-{n:02d}" for n in range(ENTRIES)]
    entries = [closed_entry(n, user_id=user) for n, user in enumerate(users)]
    assert {cluster.node_of(keys.outbox(bucket_of(u))) for u in users} == set(cluster.ports)
    doomed_log = tmp_path / "doomed.log"
    with running(["outbox", "relay"], doomed_env, doomed_log) as doomed:
        listening_port(doomed_log, doomed, message="serving metrics")
        heartbeat_match = f"{keys.relay_heartbeat('')}*"

        def beating() -> list[str]:
            return [k for found in cluster.keys_by_node(heartbeat_match).values() for k in found]

        await wait_until(lambda: bool(beating()), "the relay's heartbeat", within=20)
        (heartbeat,) = beating()
        # The broker is gone for this relay: it reads the entries and can publish none.
        amqp_proxy.cut("blackhole")
        pipe = redis.pipeline(transaction=False)
        for user, entry in zip(users, entries, strict=True):
            pipe.xadd(keys.outbox(bucket_of(user)), entry)  # type: ignore[arg-type]
        await pipe.execute()

        async def all_held() -> bool:
            held = await pending(redis, keys)
            return sum(n for by in held.values() for n in by.values()) == ENTRIES

        await wait_until(all_held, "the relay to hold every entry", within=15)
        held = await pending(redis, keys)
        (dead_consumer,) = {name for by in held.values() for name in by}
        assert {cluster.node_of(keys.outbox(b)) for b in held} == set(cluster.ports)
        doomed.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        assert doomed.wait(10) == -signal.SIGKILL
    amqp_proxy.restore()
    assert await outbox_length(redis, keys) == ENTRIES

    heard: dict[str, float] = {}
    heir_log = tmp_path / "heir.log"
    with running(["outbox", "relay"], env, heir_log) as heir:

        async def drained() -> bool:
            now = time.monotonic()
            if "heartbeat_gone" not in heard and not await redis.exists(heartbeat):
                heard["heartbeat_gone"] = now
            return await outbox_length(redis, keys) == 0

        await wait_until(drained, "another relay to publish the dead relay's entries", within=30)
        took = time.monotonic() - killed
        heir.terminate()
        assert heir.wait(15) == 0, log_tail(heir_log)
    ids = await audit_messages(settings)
    after_heartbeat = killed + took - heard.get("heartbeat_gone", killed + took)
    report_counts(
        held_by_killed_relay=ENTRIES,
        delivered=len(ids),
        takeover_seconds=round(took, 2),
        after_heartbeat_expired_seconds=round(after_heartbeat, 2),
    )
    assert dead_consumer not in {
        name for by in (await pending(redis, keys)).values() for name in by
    }
    assert sorted(ids) == sorted(str(e["event_id"]) for e in entries), log_tail(heir_log)
    assert took <= TAKEOVER_BOUND, log_tail(heir_log)


async def test_a_bad_entry_is_set_aside_and_the_rest_of_every_bucket_published(
    cluster: Cluster, settings: Settings, redis: Redis, tmp_path: Path
) -> None:
    keys = Keys(settings.redis_key_prefix)
    users = cluster.users_on_every_node(keys, "batch", 12)
    entries = [closed_entry(n, user_id=user) for n, user in enumerate(users)]
    assert {cluster.node_of(keys.outbox(bucket_of(u))) for u in users} == set(cluster.ports)
    del entries[5]["session_id"]
    pipe = redis.pipeline(transaction=False)
    for user, entry in zip(users, entries, strict=True):
        pipe.xadd(keys.outbox(bucket_of(user)), entry)  # type: ignore[arg-type]
    bad_id = (await pipe.execute())[5]
    log = tmp_path / "relay.log"
    env = settings_env(settings, LOG_LEVEL="INFO", OUTBOX_METRICS_PORT="0")
    with running(["outbox", "relay"], env, log) as relay:

        async def drained() -> bool:
            return await outbox_length(redis, keys) == 0

        await wait_until(drained, "the relay to empty every outbox", within=20)
        relay.terminate()
        assert relay.wait(15) == 0, log_tail(log)
    dead = await stream_entries(redis, keys.dead_letters)
    assert [(f[DEAD_LETTER_ENTRY_ID], f[DEAD_LETTER_FIELD]) for _, f in dead] == [
        (bad_id, "session_id")
    ]
    ids = await audit_messages(settings)
    assert sorted(ids) == sorted(str(e["event_id"]) for n, e in enumerate(entries) if n != 5)


async def test_a_relay_polls_every_bucket_without_error(
    cluster: Cluster, settings: Settings, redis: Redis, tmp_path: Path
) -> None:
    """On a cluster the relay cannot block on streams of several slots: it polls each
    bucket's outbox, with no error, and without asking Redis where each read's key is
    (COMMAND GETKEYS: 256 round trips a poll)."""
    for port in cluster.ports:
        with cluster.client(port) as node:
            node.config_resetstat()
    log = tmp_path / "relay.log"
    env = settings_env(settings, LOG_LEVEL="INFO", OUTBOX_METRICS_PORT="0")
    with running(["outbox", "relay"], env, log) as relay:
        listening_port(log, relay, message="serving metrics")
        keys = Keys(settings.redis_key_prefix)

        async def consumers_everywhere() -> bool:
            pipe = redis.pipeline(transaction=False)
            for outbox in keys.outboxes:
                pipe.xinfo_consumers(outbox, OUTBOX_GROUP)
            # Until the relay has made every bucket's group, some answer an error.
            found = await pipe.execute(raise_on_error=False)
            return all(not isinstance(c, Exception) and len(c) == 1 for c in found)

        # Its reads reach every bucket's group (a read makes the consumer).
        await wait_until(consumers_everywhere, "the relay to read every bucket", within=15)
        relay.terminate()
        assert relay.wait(15) == 0, log_tail(log)
    for port in cluster.ports:
        with cluster.client(port) as node:
            assert "cmdstat_command|getkeys" not in node.info("commandstats"), port
    lines = log.read_text().splitlines()
    levels = [json.loads(line)["level"] for line in lines if line.startswith("{")]
    assert "error" not in levels, log_tail(log)
