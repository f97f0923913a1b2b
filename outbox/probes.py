"""/healthz and /metrics of the standalone relay and sweeper (`python -m outbox`), on
OUTBOX_METRICS_PORT, served by a small aiohttp app on the process's own event loop.

Liveness is the event loop's: a task on that loop refreshes a heartbeat, and /healthz
answers 503 once the heartbeat is older than STALE_AFTER_SECONDS or the process's work
(the relay or the sweeper) has ended. A loop that is stuck answers nothing at all, so
the probe times out; one that was stuck and comes back answers 503 until it beats again.
A side thread would answer 200 while the loop is stuck. Redis or RabbitMQ being away
never fails it: a restart would not bring them back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, ProcessCollector, disable_created_metrics
from prometheus_client.aiohttp import make_aiohttp_handler
from redis.asyncio import Redis
from redis.exceptions import RedisError

from outbox.metrics import OutboxMetrics
from outbox.stream import backlog, oldest_entry_age
from session_close.keys import Keys
from session_close.settings import Settings

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 1.0
# deploy/ probes every 10 s and restarts after 3 failures: a stalled loop within 45 s.
STALE_AFTER_SECONDS = 15.0


class Liveness:
    """The loop's heartbeat and the work it runs."""

    def __init__(self, stale_after: float = STALE_AFTER_SECONDS) -> None:
        self.stale_after = stale_after
        self._last_beat = time.monotonic()
        self.work: asyncio.Task[None] | None = None

    async def beat_forever(self, every: float = HEARTBEAT_SECONDS) -> None:
        while True:
            self._last_beat = time.monotonic()
            await asyncio.sleep(every)

    def heartbeat_age(self) -> float:
        return time.monotonic() - self._last_beat

    def alive(self) -> bool:
        ended = self.work is not None and self.work.done()
        return not ended and self.heartbeat_age() <= self.stale_after


def probes_app(
    liveness: Liveness,
    metrics: OutboxMetrics,
    registry: CollectorRegistry,
    redis: Redis,
    settings: Settings,
) -> web.Application:
    keys = Keys(settings.redis_key_prefix)
    render = make_aiohttp_handler(registry)

    async def healthz(request: web.Request) -> web.Response:
        alive = liveness.alive()
        body = {"alive": alive, "heartbeatAgeSeconds": round(liveness.heartbeat_age(), 3)}
        return web.json_response(body, status=200 if alive else 503, dumps=_dumps)

    async def scrape(request: web.Request) -> web.StreamResponse:
        # The outbox as Redis has it now; while Redis is away the last values stay.
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(settings.redis_timeout_seconds):
                metrics.backlog.set(await backlog(redis, keys))
                metrics.oldest_age.set(await oldest_entry_age(redis, keys))
        return await render(request)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", scrape)
    return app


def _dumps(value: object) -> str:
    return orjson.dumps(value).decode()


def outbox_registry() -> tuple[CollectorRegistry, OutboxMetrics]:
    """The process's own registry: the outbox series and the process's CPU and memory."""
    # No `_created` series, as the API and the workers (the switch is the process's).
    disable_created_metrics()  # type: ignore[no-untyped-call]
    registry = CollectorRegistry()
    metrics = OutboxMetrics(registry)
    ProcessCollector(registry=registry)
    return registry, metrics


@asynccontextmanager
async def serving_probes(
    settings: Settings,
    redis: Redis,
    liveness: Liveness,
    registry: CollectorRegistry,
    metrics: OutboxMetrics,
) -> AsyncIterator[int]:
    """Beat and serve on OUTBOX_METRICS_PORT (0: a free port) until the block ends;
    yields the port bound."""
    # No access log: the probes come every few seconds.
    runner = web.AppRunner(
        probes_app(liveness, metrics, registry, redis, settings), access_log=None
    )
    await runner.setup()
    beating = asyncio.create_task(liveness.beat_forever(), name="outbox-liveness")
    try:
        site = web.TCPSite(runner, "0.0.0.0", settings.outbox_metrics_port)
        await site.start()
        port = int(runner.addresses[0][1])
        log.info("serving metrics", extra={"port": port})
        yield port
    finally:
        await runner.cleanup()
        beating.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beating
