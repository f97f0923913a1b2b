"""session_close.amqp: connecting waits for the broker; giving up on it leaves nothing behind."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import pytest

from session_close import amqp
from session_close.retry import Policy
from session_close.settings import Settings
from tests.conftest import through
from tests.support.proxy import Mode, TcpProxy
from tests.support.waiting import wait_until


def _reconnect_tasks() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if "connection_factory" in repr(t.get_coro())]


@pytest.mark.parametrize("mode", ["reset", "blackhole"])
async def test_a_cancelled_connect_leaves_no_reconnect_task_running(
    settings: Settings, amqp_proxy: TcpProxy, mode: Mode
) -> None:
    """aio-pika's robust reconnect task ignores cancellation until its connection is
    closed; one left behind keeps the event loop (and so the process) from stopping."""
    amqp_proxy.cut(mode)
    unreachable = dataclasses.replace(settings, amqp_url=through(settings.amqp_url, amqp_proxy))
    task = asyncio.create_task(amqp.connect(unreachable))

    # Wait for the broker to have been asked, not for the reconnect task itself: after a
    # reset that task lives for less than any poll interval. Blackholed, the attempt now
    # hangs in flight until its timeout, which is the case that once hung shutdown.
    async def attempted() -> bool:
        return amqp_proxy.accepted >= 1

    await wait_until(attempted, "a connection attempt", within=10)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task

    async def none_left() -> bool:
        return not _reconnect_tasks()

    await wait_until(none_left, "the attempt's reconnect task to end", within=5)


async def test_connect_waits_for_the_broker_and_returns_once_it_is_back(
    settings: Settings, amqp_proxy: TcpProxy
) -> None:
    amqp_proxy.cut("reset")
    unreachable = dataclasses.replace(settings, amqp_url=through(settings.amqp_url, amqp_proxy))
    task = asyncio.create_task(amqp.connect(unreachable, policy=Policy(first=0.2, cap=0.2)))

    async def retried() -> bool:
        return amqp_proxy.accepted >= 3

    await wait_until(retried, "connect to try again twice", within=10)
    assert not task.done()
    amqp_proxy.restore()
    connection = await asyncio.wait_for(task, 10)
    try:
        assert amqp.is_open(connection)
    finally:
        await connection.close()
