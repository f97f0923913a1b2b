"""Waiting for a condition in a test: poll it until it holds, fail at a deadline naming
what was awaited. `wait_until` is for tests and fixtures on the event loop;
`wait_until_blocking` for the synchronous ones (a subprocess a sync fixture starts)."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]],
    what: str,
    *,
    within: float = 15.0,
    step: float = 0.02,
) -> None:
    """Poll `condition` (sync or async) every `step` seconds until it holds; raise an
    AssertionError naming `what` after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        held = condition()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(step)  # a poll interval, not a wait for the condition


def wait_until_blocking(
    condition: Callable[[], bool], what: str, *, within: float = 15.0, step: float = 0.02
) -> None:
    """`wait_until` for code that runs outside the event loop."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        time.sleep(step)
