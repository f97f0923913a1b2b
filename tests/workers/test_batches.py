"""The runner's batches against the real RabbitMQ: deliveries share an effect call, a
batch never holds more than WORKER_CONCURRENCY messages, and neither do the batches in
work together, messages being retried included."""

from __future__ import annotations

import asyncio

from session_close.events import SessionEvent
from session_close.settings import Settings
from tests.support.waiting import wait_until
from tests.support.workers import (
    Broker,
    in_process,
    make_event,
    opening,
    retry_count,
    running,
    settled_count,
)

CONCURRENCY = 7


class Recording:
    """A test-only effect that takes a while per call and records what it was given.
    The events of `fail_first` fail their first two attempts, as if their backend had
    been unreachable (transient), so they are held for retry meanwhile."""

    def transient(self, exc: BaseException) -> bool:
        return isinstance(exc, ConnectionError)

    def __init__(self, fail_first: set[str]) -> None:
        self.batches: list[int] = []
        self.applied: set[str] = set()
        self.failures: dict[str, int] = dict.fromkeys(fail_first, 0)
        self.in_work = 0  # events inside apply calls, plus those waiting to be retried
        self.most_in_work = 0

    async def apply(self, events: list[SessionEvent]) -> list[BaseException | None]:
        retried = sum(1 for e in events if self.failures.get(e.event_id, 0) > 0)
        self.in_work += len(events) - retried  # a retried event was counted in work already
        self.most_in_work = max(self.most_in_work, self.in_work)
        self.batches.append(len(events))
        await asyncio.sleep(0.02)
        results: list[BaseException | None] = []
        for event in events:
            tried = self.failures.get(event.event_id)
            if tried is not None and tried < 2:
                self.failures[event.event_id] = tried + 1
                results.append(ConnectionError("backend unreachable"))  # stays in work
                continue
            self.applied.add(event.event_id)
            self.in_work -= 1
            results.append(None)
        return results


async def test_batches_share_deliveries_and_never_exceed_the_concurrency_retries_included(
    settings: Settings, broker: Broker
) -> None:
    events = [make_event(n) for n in range(120)]
    effect = Recording(fail_first={events[3].event_id, events[50].event_id})

    worker = in_process(
        settings,
        "audit",
        opening(effect),
        worker_prefetch=100,
        worker_concurrency=CONCURRENCY,
    )
    async with running(worker):
        await broker.publish(*events)

        async def all_applied() -> bool:
            return len(effect.applied) == len(events)

        await wait_until(all_applied, "every event applied", within=30)

        async def all_acked() -> bool:
            settled = settled_count(worker.metrics, "acked") + settled_count(
                worker.metrics, "retried"
            )
            return settled == len(events)

        await wait_until(all_acked, "every message acked")
    assert max(effect.batches) <= CONCURRENCY
    assert effect.most_in_work <= CONCURRENCY
    # The deliveries of a burst shared calls: far fewer calls than events.
    assert len(effect.batches) <= len(events) / 2
    assert settled_count(worker.metrics, "retried") == 2
    assert retry_count(worker.metrics) == 4


class BuggyOnce:
    """A test-only effect with a bug on its first call: it answers for one event fewer
    than it was given."""

    def transient(self, exc: BaseException) -> bool:
        return False

    def __init__(self) -> None:
        self.calls = 0
        self.applied: list[str] = []

    async def apply(self, events: list[SessionEvent]) -> list[BaseException | None]:
        self.calls += 1
        if self.calls == 1:
            return [None] * (len(events) - 1)
        self.applied.extend(e.event_id for e in events)
        return [None] * len(events)


async def test_a_batch_the_runner_fails_on_goes_back_to_the_queue_and_holds_nobody_back(
    settings: Settings, broker: Broker
) -> None:
    effect = BuggyOnce()

    first = [make_event(n) for n in range(5)]
    later = [make_event(n) for n in range(5, 10)]
    worker = in_process(settings, "audit", opening(effect))
    async with running(worker):
        await broker.publish_in_order(*first)
        await wait_until(lambda: effect.calls >= 1, "the call the runner fails on")
        await broker.publish_in_order(*later)

        # The messages behind the failed batch are acked: were it still held, the acks of
        # everything delivered after it would wait for it.
        async def later_acked() -> bool:
            return settled_count(worker.metrics, "acked") >= len(later)

        await wait_until(later_acked, "the messages behind the failed batch acked")

        async def all_applied() -> bool:
            return set(effect.applied) >= {e.event_id for e in first + later}

        await wait_until(all_applied, "every event applied, the handed-back ones too")

        async def all_acked() -> bool:
            return settled_count(worker.metrics, "acked") == len(first) + len(later)

        await wait_until(all_acked, "every message acked")
    # The worker has closed its connection: a message not really acked would be back.
    ready, _ = await broker.depth(broker.topology.queue("audit"))
    assert ready == 0
