"""Fault suite, API side: the broker cut during closes, and the API SIGKILLed with
events still in its outbox. The API runs as a real process (`python -m service`)."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import aio_pika
import aiohttp
import pytest
from redis.asyncio import Redis

from session_close.cli import create_session, create_token
from session_close.keys import Keys
from session_close.settings import Settings
from session_close.topology import Topology
from tests.conftest import through
from tests.support.events import collect_event_ids
from tests.support.processes import free_port, log_tail, running, settings_env, wait_for_port
from tests.support.proxy import TcpProxy

pytestmark = [pytest.mark.fault, pytest.mark.timeout(120)]

CLOSES = 500
HEADERS = {
    "Content-Type": "application/json; multipart/form-data;",
    "OS": "Android",
    "AppVersion": "1.0.10",
    "Authorization": "Basic fault-token",
}


async def seed(redis: Redis, keys: Keys, n: int) -> list[str]:
    await create_token(redis, keys, "fault-user", "fault-token", 600)
    sids = [f"fault-session-{i:05d}" for i in range(n)]
    for sid in sids:
        await create_session(redis, keys, "fault-user", sid, ttl=600)
    return sids


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


async def topology_declared(settings: Settings, deadline: float = 15.0) -> None:
    queue = Topology.from_settings(settings).queue("audit")
    end = asyncio.get_running_loop().time() + deadline
    while True:
        connection = await aio_pika.connect(settings.amqp_url)
        async with connection:
            try:
                channel = await connection.channel()
                await channel.declare_queue(queue, passive=True)
                return
            except aio_pika.exceptions.ChannelClosed:
                if asyncio.get_running_loop().time() > end:
                    raise
        await asyncio.sleep(0.1)  # the API declares it on its own schedule


async def wait_until(condition: Callable[[], Awaitable[bool]], deadline: float) -> None:
    end = asyncio.get_running_loop().time() + deadline
    while not await condition():
        assert asyncio.get_running_loop().time() < end, "condition not met in time"
        await asyncio.sleep(0.05)


@pytest.fixture
def api_env(settings: Settings, amqp_proxy: TcpProxy) -> dict[str, str]:
    return settings_env(
        dataclasses.replace(settings, amqp_url=through(settings.amqp_url, amqp_proxy)),
        HTTP_HOST="127.0.0.1",
        LOG_LEVEL="WARNING",
    )


async def test_broker_cut_during_closes_loses_no_event(
    settings: Settings,
    redis: Redis,
    keys: Keys,
    amqp_proxy: TcpProxy,
    api_env: dict[str, str],
    amqp_cleanup: None,
    report_counts: Callable[..., None],
    tmp_path: Path,
) -> None:
    sids = await seed(redis, keys, CLOSES)
    port = free_port()
    with running(["service"], {**api_env, "HTTP_PORT": str(port)}, tmp_path / "api.log") as api:
        wait_for_port(port, api)
        await topology_declared(settings)
        amqp_proxy.cut()
        replies = await close_all(port, sids)
        backlog_while_cut = await redis.xlen(keys.outbox)
        amqp_proxy.restore()
        seen = await collect_event_ids(settings, "audit", CLOSES, deadline=60)
        await wait_until(lambda: _empty(redis, keys), 10)
    report_counts(
        sent=CLOSES,
        succeeded=replies.count("success"),
        backlog_while_cut=backlog_while_cut,
        events_delivered=len(seen),
        duplicates=sum(n - 1 for n in seen.values()),
    )
    assert replies.count("success") == CLOSES
    assert backlog_while_cut > 0
    assert len(seen) == CLOSES, log_tail(tmp_path / "api.log")


async def test_api_sigkill_with_outbox_backlog_is_published_by_the_restart(
    settings: Settings,
    redis: Redis,
    keys: Keys,
    amqp_proxy: TcpProxy,
    api_env: dict[str, str],
    amqp_cleanup: None,
    report_counts: Callable[..., None],
    tmp_path: Path,
) -> None:
    sids = await seed(redis, keys, CLOSES)
    env = {**api_env, "RELAY_CLAIM_IDLE_SECONDS": "1"}
    port = free_port()
    with running(["service"], {**env, "HTTP_PORT": str(port)}, tmp_path / "api1.log") as api:
        wait_for_port(port, api)
        await topology_declared(settings)
        amqp_proxy.cut()
        replies = await close_all(port, sids)
        api.send_signal(signal.SIGKILL)
        api.wait(10)
    backlog_at_kill = await redis.xlen(keys.outbox)
    # entries the killed relay had read but never got confirmed stay pending under its name
    pending_at_kill = (await redis.xpending(keys.outbox, "relay"))["pending"]
    amqp_proxy.restore()
    port = free_port()
    with running(["service"], {**env, "HTTP_PORT": str(port)}, tmp_path / "api2.log") as api:
        wait_for_port(port, api)
        seen = await collect_event_ids(settings, "audit", CLOSES, deadline=60)
        await wait_until(lambda: _empty(redis, keys), 10)
    report_counts(
        sent=CLOSES,
        succeeded=replies.count("success"),
        backlog_at_kill=backlog_at_kill,
        pending_of_killed_relay=pending_at_kill,
        events_delivered=len(seen),
        duplicates=sum(n - 1 for n in seen.values()),
    )
    assert replies.count("success") == CLOSES
    assert backlog_at_kill == CLOSES
    assert len(seen) == CLOSES, log_tail(tmp_path / "api2.log")


async def _empty(redis: Redis, keys: Keys) -> bool:
    return int(await redis.xlen(keys.outbox)) == 0
