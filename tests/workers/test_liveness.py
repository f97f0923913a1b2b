"""A worker's liveness reflects its event loop: /healthz on the metrics port turns 503
once the loop has not beaten for `stale_after` seconds (while the metrics thread still
answers), and 200 again when the loop runs."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request

from session_close.events import SessionEvent
from session_close.settings import Settings
from tests.support.waiting import wait_until
from tests.support.workers import (
    Broker,
    in_process,
    make_event,
    opening,
    running,
)
from workers.metrics import WorkerMetrics

STALE_AFTER = 1.0
BLOCKED_FOR = 4.0


class BlocksTheLoop:
    """A test-only effect that stalls the event loop, as a blocking call would."""

    def transient(self, exc: BaseException) -> bool:
        return False

    def __init__(self) -> None:
        self.blocked_at: float | None = None
        self.released_at: float | None = None

    async def apply(self, events: list[SessionEvent]) -> list[BaseException | None]:
        self.blocked_at = time.monotonic()
        time.sleep(BLOCKED_FOR)  # noqa: ASYNC251 (the point of the test)
        self.released_at = time.monotonic()
        return [None] * len(events)


class Prober(threading.Thread):
    """Polls /healthz from its own thread, as the kubelet would, recording (time, status)."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{port}/healthz"
        self.seen: list[tuple[float, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.1):
            try:
                with urllib.request.urlopen(self.url, timeout=2) as resp:
                    status = resp.status
            except urllib.error.HTTPError as exc:
                status = exc.code
            self.seen.append((time.monotonic(), status))


async def test_liveness_fails_while_the_event_loop_is_stuck_and_recovers_after(
    settings: Settings, broker: Broker
) -> None:
    effect = BlocksTheLoop()

    metrics = WorkerMetrics("audit", stale_after=STALE_AFTER)
    port = metrics.serve(0, "127.0.0.1")
    prober = Prober(port)
    worker = in_process(settings, "audit", opening(effect), metrics=metrics, heartbeat_seconds=0.1)
    try:
        async with running(worker):
            prober.start()

            async def probed_alive() -> bool:
                return any(status == 200 for _, status in prober.seen)

            await wait_until(probed_alive, "a healthy probe before the stall")
            await broker.publish(make_event())

            async def recovered() -> bool:
                released = effect.released_at
                return released is not None and any(
                    t > released and status == 200 for t, status in prober.seen
                )

            await wait_until(recovered, "a healthy probe after the stall", within=30)
    finally:
        prober.done.set()
        prober.join(5)
        metrics.close()
    assert effect.blocked_at is not None
    assert effect.released_at is not None
    failing = [t for t, status in prober.seen if status == 503]
    assert failing, "the probe never failed while the loop was stuck"
    # It failed within the staleness bound (plus a generous margin for a busy machine)
    # of the stall, and only around it.
    assert failing[0] - effect.blocked_at <= STALE_AFTER + 1.5
    assert all(effect.blocked_at < t for t in failing)
    assert all(t < effect.released_at + 1.0 for t in failing)
