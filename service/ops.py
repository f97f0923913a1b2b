"""The operational endpoints (/healthz, /readyz, /metrics, /openapi.json) and the
middleware that measures every request."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from aio_pika.abc import AbstractRobustConnection
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client.aiohttp import make_aiohttp_handler
from redis.exceptions import RedisError

from service.appkeys import AMQP, METRICS, REDIS, REQUEST_STARTED, SETTINGS
from service.metrics import UNMATCHED, Metrics
from service.middlewares import CLIENT_CLOSED
from service.openapi import spec_json
from service.relay import backlog
from service.replies import Reply, info_reply
from session_close import amqp
from session_close.keys import Keys

log = logging.getLogger(__name__)


@web.middleware
async def measure_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    start = request[REQUEST_STARTED] = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = CLIENT_CLOSED
        raise
    finally:
        # The route template, never the raw path, so label values stay bounded.
        resource = request.match_info.route.resource
        request.app[METRICS].observe_request(
            resource.canonical if resource is not None else UNMATCHED,
            request.method,
            status,
            time.perf_counter() - start,
        )


async def healthz(request: web.Request) -> web.Response:
    return info_reply(request, Reply.ALIVE)


def _amqp_open(task: asyncio.Task[AbstractRobustConnection]) -> bool:
    if not task.done() or task.cancelled() or task.exception() is not None:
        return False
    return amqp.is_open(task.result())


@dataclass(frozen=True, slots=True)
class Dependencies:
    redis_up: bool
    rabbitmq_up: bool
    outbox_backlog: int

    def body(self) -> dict[str, object]:
        return {
            "redis": "up" if self.redis_up else "down",
            "rabbitmq": "up" if self.rabbitmq_up else "down",
            "outboxBacklog": self.outbox_backlog,
        }


async def check_dependencies(app: web.Application) -> Dependencies:
    """What /readyz and /metrics report; records it in the metrics."""
    settings = app[SETTINGS]
    pending: int | None = None
    try:
        # XLEN answers only when Redis does, so it doubles as the ping.
        async with asyncio.timeout(settings.redis_timeout_seconds):
            pending = await backlog(app[REDIS], Keys(settings.redis_key_prefix))
    except (RedisError, OSError, TimeoutError) as exc:
        log.warning("Redis unreachable", extra={"error": repr(exc)})
    rabbitmq_up = _amqp_open(app[AMQP])
    last = app[METRICS].dependencies(
        redis_up=pending is not None, rabbitmq_up=rabbitmq_up, backlog=pending
    )
    return Dependencies(pending is not None, rabbitmq_up, last)


async def readyz(request: web.Request) -> web.Response:
    # Ready means "can close sessions". RabbitMQ and the backlog are reported only: a
    # probe failing on them would take every pod out of the Service during a broker
    # outage, exactly while the outbox carries the closes.
    seen = await check_dependencies(request.app)
    reply = Reply.READY if seen.redis_up else Reply.NOT_READY
    return info_reply(request, reply, beside=seen.body())


async def _read_oldest_entry_age(app: web.Application) -> None:
    """The age of the outbox's first entry, from its id (Redis's clock, in ms): one
    XRANGE of one entry and one TIME, in one round trip."""
    settings = app[SETTINGS]
    async with asyncio.timeout(settings.redis_timeout_seconds):
        pipe = app[REDIS].pipeline(transaction=False)
        pipe.xrange(Keys(settings.redis_key_prefix).outbox, count=1)
        pipe.time()
        first, (seconds, micros) = await pipe.execute()
    age = 0.0
    if first:
        entry_ms = int(str(first[0][0]).split("-", 1)[0])
        age = max(0.0, seconds + micros / 1e6 - entry_ms / 1000)
    app[METRICS].outbox_oldest_age.set(age)


async def read_scraped_values(app: web.Application) -> None:
    """The values read at scrape time. A scrape while Redis is away still answers; the
    backlog keeps its last value."""
    await check_dependencies(app)
    with contextlib.suppress(RedisError, OSError, TimeoutError):
        await _read_oldest_entry_age(app)


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=spec_json(), content_type="application/json")


def setup_ops(app: web.Application) -> None:
    """The app's metrics and the operational routes; call it after the app's own routes,
    whose series it creates."""
    metrics = app[METRICS] = Metrics()
    for route in app.router.routes():
        if route.method == "POST" and route.resource is not None:
            metrics.expect_requests(route.resource.canonical, route.method)
    # prometheus_client's own handler: the format the scraper accepts (text or
    # OpenMetrics), compressed when it asks.
    render = make_aiohttp_handler(metrics.registry)

    async def scrape(request: web.Request) -> web.StreamResponse:
        await read_scraped_values(request.app)
        return await render(request)

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", scrape)
    app.router.add_get("/openapi.json", openapi)
