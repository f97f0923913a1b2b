"""The one retry mechanism: capped exponential backoff with jitter.

`Policy.delay` is the delay after n failed attempts (a delivery whose attempts are
counted in a database); `Backoff` is the state of one retry loop (the relay's read loop,
a worker holding a message); `retry()` runs one step until it succeeds (connecting to a
backend at start).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Policy:
    first: float = 0.1
    cap: float = 5.0
    # Spread the retries of many processes that failed together (+-20%).
    jitter: float = 0.2

    def delay(self, attempts: int) -> float:
        """The delay after `attempts` failed attempts (1: the first delay), doubling each
        time up to the cap, jittered."""
        base = min(self.first * 2.0 ** min(attempts - 1, 62), self.cap)
        return base * random.uniform(1 - self.jitter, 1 + self.jitter)


DEFAULT = Policy()


class Backoff:
    def __init__(self, policy: Policy = DEFAULT) -> None:
        self.policy = policy
        self._failed = 0

    def next_delay(self) -> float:
        """The delay before the next attempt; each call doubles the following one."""
        self._failed += 1
        return self.policy.delay(self._failed)

    def reset(self) -> None:
        self._failed = 0

    async def sleep(self) -> None:
        await pause(self.next_delay())


async def pause(seconds: float) -> None:
    """asyncio.sleep for a loop that runs until its task is cancelled. On Python 3.11 a
    cancel that meets a timeout inside a step (asyncio.timeout's, redis-py's) can come out
    as a TimeoutError the loop takes for an outage, or not at all: the task stays
    "cancelling" with nothing left to deliver it, the loop goes on, and whoever awaits
    the task (a shutdown) waits forever. Such a cancel is raised here instead."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
    await asyncio.sleep(seconds)


async def retry(
    what: str,
    attempt: Callable[[], Awaitable[T]],
    *,
    policy: Policy = DEFAULT,
    transient: tuple[type[BaseException], ...] = (Exception,),
) -> T:
    """Run `attempt` until it returns; a failure of a `transient` type is logged and
    retried after a backoff, any other propagates."""
    backoff = Backoff(policy)
    attempts = 0
    while True:
        attempts += 1
        try:
            return await attempt()
        except transient as exc:
            delay = backoff.next_delay()
            log.warning(
                "failed; retrying",
                extra={"operation": what, "attempt": attempts, "error": repr(exc), "delay": delay},
            )
        await pause(delay)
