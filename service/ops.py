"""The operational endpoints (/healthz, /readyz, /metrics, /openapi.json) and the
middleware that measures every request."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from aio_pika.abc import AbstractRobustConnection
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

from service.appkeys import AMQP, METRICS, REDIS, REQUEST_STARTED, SETTINGS
from service.metrics import UNMATCHED, Metrics
from service.openapi import spec_json
from service.relay import backlog
from service.replies import Reply, info_reply
from session_close import amqp
from session_close.keys import Keys

log = logging.getLogger(__name__)

# nginx's code for "the client went away before the reply": not the server's fault.
CLIENT_CLOSED = 499


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


async def _read_backlog(app: web.Application) -> int:
    settings = app[SETTINGS]
    async with asyncio.timeout(settings.redis_timeout_seconds):
        pending = await backlog(app[REDIS], Keys(settings.redis_key_prefix))
    app[METRICS].outbox_backlog.set(pending)
    return pending


async def readyz(request: web.Request) -> web.Response:
    app = request.app
    limit = app[SETTINGS].ready_max_backlog
    problems = []
    try:
        # XLEN answers only when Redis does, so it doubles as the ping.
        pending = await _read_backlog(app)
    except (RedisError, OSError, TimeoutError) as exc:
        problems.append(f"Redis unreachable ({exc!r})")
    else:
        if pending > limit:
            problems.append(f"outbox backlog {pending} over READY_MAX_BACKLOG={limit}")
    if not _amqp_open(app[AMQP]):
        problems.append("RabbitMQ not connected")
    if problems:
        log.warning("not ready: %s", "; ".join(problems))
        return info_reply(request, Reply.NOT_READY)
    return info_reply(request, Reply.READY)


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


async def metrics(request: web.Request) -> web.Response:
    # A scrape while Redis is away still answers; the backlog keeps its last value.
    with contextlib.suppress(RedisError, OSError, TimeoutError):
        await _read_backlog(request.app)
    with contextlib.suppress(RedisError, OSError, TimeoutError):
        await _read_oldest_entry_age(request.app)
    return web.Response(
        body=generate_latest(request.app[METRICS].registry),
        headers={"Content-Type": CONTENT_TYPE_LATEST},
    )


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=spec_json(), content_type="application/json")


def setup_ops(app: web.Application) -> None:
    """The app's metrics and the operational routes."""
    app[METRICS] = Metrics()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
