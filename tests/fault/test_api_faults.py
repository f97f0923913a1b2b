"""Fault suite, API side: the broker cut during closes, and the API SIGKILLed with
events still in its outbox. The API runs as a real process (`python -m service`)."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import time
from collections.abc import Callable
from pathlib import Path

import aio_pika
import aiohttp
import pytest
from redis.asyncio import Redis

from outbox.stream import backlog
from session_close.cli import create_session, create_token
from session_close.keys import OUTBOX_GROUP, Keys
from session_close.settings import Settings
from session_close.topology import Topology
from tests.conftest import through
from tests.support.events import collect_event_ids
from tests.support.processes import listening_port, log_tail, running, settings_env
from tests.support.proxy import Mode, TcpProxy
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.fault, pytest.mark.timeout(120)]

CLOSES = 500
WARM_UP = 20
HEADERS = {
    "Content-Type": "application/json; multipart/form-data;",
    "OS": "Android",
    "AppVersion": "1.0.10",
    "Authorization": "Basic fault-token",
}


async def seed(redis: Redis, keys: Keys, n: int) -> tuple[list[str], list[str]]:
    """The warm-up sessions, closed before the cut, and the `n` closed during it."""
    await create_token(redis, keys, "fault-user", "fault-token", 600)
    sids = [f"fault-session-{i:05d}" for i in range(WARM_UP + n)]
    for sid in sids:
        await create_session(redis, keys, "fault-user", sid, ttl=600)
    return sids[:WARM_UP], sids[WARM_UP:]


async def close_all(port: int, sids: list[str]) -> list[str]:
    """Close every session (32 at a time); return each reply's info.type."""
    limit = asyncio.Semaphore(32)
    url = f"http://127.0.0.1:{port}/v1.0/session/close"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:

        async def close(sid: str) -> str:
            async with (
                limit,
                http.post(
                    url, headers={**HEADERS, "SessionID": sid}, data=b'{"requestContent": {}}'
                ) as resp,
            ):
                body = await resp.json()
                return str(body["info"]["type"]) if resp.status == 200 else str(resp.status)

        return await asyncio.gather(*(close(sid) for sid in sids))


async def topology_declared(settings: Settings) -> None:
    """Wait until the API has declared the topology (on its own schedule)."""
    queue = Topology.from_settings(settings).queue("audit")

    async def declared() -> bool:
        connection = await aio_pika.connect(settings.amqp_url)
        async with connection:
            try:
                channel = await connection.channel()
                await channel.declare_queue(queue, passive=True)
            except aio_pika.exceptions.ChannelClosed:
                return False
            return True

    await wait_until(declared, "the API to declare the topology", step=0.1)


async def publishing(port: int, redis: Redis, keys: Keys, sids: list[str]) -> None:
    """Close `sids` and wait until their events are confirmed: the relay is up and
    publishing, so a cut after this catches it holding entries."""
    assert await close_all(port, sids) == ["success"] * len(sids)
    await wait_until(lambda: _empty(redis, keys), "the warm-up events to be published", within=30)


async def held_by_relays(redis: Redis, keys: Keys) -> int:
    """Entries a relay read and has not had confirmed (they stay pending under its name)."""
    pipe = redis.pipeline(transaction=False)
    for outbox in keys.outboxes:
        pipe.xpending(outbox, OUTBOX_GROUP)
    return sum(int(found["pending"]) for found in await pipe.execute())


async def wait_for_held(redis: Redis, keys: Keys) -> int:
    async def holding() -> bool:
        return await held_by_relays(redis, keys) > 0

    await wait_until(holding, "the relay to hold entries while the broker is cut", within=15)
    return await held_by_relays(redis, keys)


@pytest.fixture
def api_env(settings: Settings, amqp_proxy: TcpProxy) -> dict[str, str]:
    return settings_env(
        dataclasses.replace(settings, amqp_url=through(settings.amqp_url, amqp_proxy)),
        HTTP_HOST="127.0.0.1",
        HTTP_PORT="0",  # the API binds a free port and logs it: no port to race for
        LOG_LEVEL="INFO",
        # The default: a confirm slowed by a busy machine must not turn into a repeat,
        # since these tests count repeats (a cut broker fails publishes at once anyway).
        PUBLISH_TIMEOUT_SECONDS="5",
    )


# reset: a dead broker (publishes fail at once); silent: a hung one (publishes go out and
# are never confirmed, so only waiting for the confirm keeps the entries).
@pytest.mark.parametrize("mode", ["reset", "silent"])
async def test_broker_cut_during_closes_loses_no_event(
    mode: Mode,
    settings: Settings,
    redis: Redis,
    keys: Keys,
    amqp_proxy: TcpProxy,
    api_env: dict[str, str],
    amqp_cleanup: None,
    report_counts: Callable[..., None],
    tmp_path: Path,
) -> None:
    warm_up, sids = await seed(redis, keys, CLOSES)
    log = tmp_path / "api.log"
    with running(["service"], api_env, log) as api:
        port = listening_port(log, api)
        await topology_declared(settings)
        await publishing(port, redis, keys, warm_up)
        amqp_proxy.cut(mode)
        replies = await close_all(port, sids)
        held_during_cut = await wait_for_held(redis, keys)
        backlog_while_cut = await backlog(redis, keys)
        amqp_proxy.restore()
        seen = await collect_event_ids(settings, "audit", WARM_UP + CLOSES, deadline=60)
        await wait_until(lambda: _empty(redis, keys), "the outbox to be empty", within=10)
    duplicates = sum(n - 1 for n in seen.values())
    report_counts(
        sent=len(replies),
        succeeded=replies.count("success"),
        held_during_cut=held_during_cut,
        backlog_while_cut=backlog_while_cut,
        events_delivered=len(seen),
        duplicates=duplicates,
    )
    assert len(replies) == replies.count("success") == CLOSES
    assert 0 < held_during_cut <= settings.relay_batch_size
    assert backlog_while_cut == CLOSES
    assert len(seen) == WARM_UP + CLOSES, log_tail(tmp_path / "api.log")
    # Nothing reached the broker during the cut and it was idle when cut: no repeats.
    assert duplicates == 0


async def test_api_sigkill_with_outbox_backlog_is_published_by_the_restart_within_10_s(
    settings: Settings,
    redis: Redis,
    keys: Keys,
    amqp_proxy: TcpProxy,
    api_env: dict[str, str],
    amqp_cleanup: None,
    report_counts: Callable[..., None],
    tmp_path: Path,
) -> None:
    warm_up, sids = await seed(redis, keys, CLOSES)
    log = tmp_path / "api1.log"
    with running(["service"], api_env, log) as api:
        port = listening_port(log, api)
        await topology_declared(settings)
        await publishing(port, redis, keys, warm_up)
        amqp_proxy.cut()
        replies = await close_all(port, sids)
        # entries the relay read but never got confirmed stay pending under its name
        pending_of_killed_relay = await wait_for_held(redis, keys)
        api.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        api.wait(10)
    backlog_at_kill = await backlog(redis, keys)
    amqp_proxy.restore()
    with running(["service"], api_env, tmp_path / "api2.log"):
        await wait_until(
            lambda: _empty(redis, keys), "the successor to publish everything", within=30
        )
        takeover_seconds = time.monotonic() - killed
        seen = await collect_event_ids(settings, "audit", WARM_UP + CLOSES, deadline=60)
    duplicates = sum(n - 1 for n in seen.values())
    report_counts(
        sent=len(replies),
        succeeded=replies.count("success"),
        backlog_at_kill=backlog_at_kill,
        pending_of_killed_relay=pending_of_killed_relay,
        takeover_seconds=round(takeover_seconds, 2),
        events_delivered=len(seen),
        duplicates=duplicates,
    )
    assert len(replies) == replies.count("success") == CLOSES
    assert backlog_at_kill == CLOSES
    assert 0 < pending_of_killed_relay <= settings.relay_batch_size
    assert len(seen) == WARM_UP + CLOSES, log_tail(tmp_path / "api2.log")
    assert duplicates == 0
    # The contract: published by another within 10 s of the relay's death.
    assert takeover_seconds <= 10, log_tail(tmp_path / "api2.log")


async def _empty(redis: Redis, keys: Keys) -> bool:
    return int(await backlog(redis, keys)) == 0
