"""The loops that run until cancelled (the sweeper, the relay's heartbeat, every Backoff)
stop on a cancel even when a step swallowed it: on Python 3.11 a cancel that meets a
timeout inside redis-py can come out as a TimeoutError, or not at all. A fresh-clone run
hung its teardown for good on a sweeper that had gone back to sleep that way."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from session_close.retry import Backoff, Policy, pause


async def stops_on_cancel(loop: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> bool:
    """Start the loop, cancel it while its step runs: did it end, cancelled, within 2 s?"""
    stepping = asyncio.Event()
    task = asyncio.create_task(loop(stepping))
    await stepping.wait()
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=2)
    return task in done and task.cancelled()


async def test_a_loop_whose_step_swallowed_the_cancel_stops_at_its_next_pause() -> None:
    async def loop(stepping: asyncio.Event) -> None:
        while True:
            try:
                stepping.set()
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                pass  # what a step may do with a cancel that met its own timeout
            await pause(10)

    assert await stops_on_cancel(loop)


async def test_a_backoff_after_a_cancel_turned_into_a_timeout_error_stops_its_loop() -> None:
    async def step() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            raise TimeoutError from None  # what a timeout meeting the cancel may raise

    async def loop(stepping: asyncio.Event) -> None:
        backoff = Backoff(Policy(first=10, cap=10))
        while True:
            try:
                stepping.set()
                await step()
            except TimeoutError:
                pass  # taken for an outage, as the loops take it
            await backoff.sleep()

    assert await stops_on_cancel(loop)


async def test_pause_sleeps_when_no_cancel_is_pending() -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    await pause(0.05)
    assert loop.time() - started >= 0.05
