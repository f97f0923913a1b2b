"""Micro-batching: calls made close together share one round trip to a backend.

Each caller awaits its own result; the batch is flushed when it is full, or when the
current event-loop iteration ends. At most
`max_in_flight` batches run at once: while all are busy, new calls gather into the next
batch, and callers that gave up meanwhile (their future cancelled) are left out of it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

FlushFn = Callable[[list[T]], Awaitable[Sequence[R | BaseException]]]


class Batcher(Generic[T, R]):
    def __init__(
        self,
        flush: FlushFn[T, R],
        *,
        max_size: int,
        max_in_flight: int | None = None,
    ) -> None:
        self._flush = flush
        self._max_size = max_size
        self._max_in_flight = max_in_flight
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._timer: asyncio.Handle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._pending.append((item, future))
        if len(self._pending) >= self._max_size:
            self._start_flush()
        elif self._timer is None:
            self._timer = loop.call_soon(self._start_flush)
        return await future

    def _start_flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._max_in_flight is not None and len(self._tasks) >= self._max_in_flight:
            return  # the next batch to finish starts this one
        self._pending = [(item, future) for item, future in self._pending if not future.done()]
        batch, self._pending = self._pending[: self._max_size], self._pending[self._max_size :]
        if batch:
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._pending and self._timer is None:
            self._timer = asyncio.get_running_loop().call_soon(self._start_flush)

    async def _run(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await self._flush([item for item, _ in batch])
        except BaseException as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():  # the caller gave up (timeout, cancelled)
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def drain(self) -> None:
        """Flush what is queued and wait for every batch in flight (for shutdown)."""
        while self._pending or self._tasks:
            self._start_flush()
            await asyncio.gather(*self._tasks, return_exceptions=True)


def split_on_content_failure(
    flush: FlushFn[T, R], transient: Callable[[BaseException], bool]
) -> FlushFn[T, R]:
    """A batch flush that, when the batch fails for something other than its backend
    (an error `transient` accepts), flushes each item alone: the items that fail alone
    get their own error, the others their result, so one bad item cannot fail the batch
    it shared."""

    async def alone(item: T) -> R:
        [result] = await flush([item])
        if isinstance(result, BaseException):
            raise result
        return result

    async def flush_or_split(items: list[T]) -> Sequence[R | BaseException]:
        try:
            return await flush(items)
        except Exception as exc:
            if transient(exc) or len(items) == 1:
                raise
            log.warning("a batch failed for its content; applying its items one by one")
            return await asyncio.gather(*(alone(item) for item in items), return_exceptions=True)

    return flush_or_split
