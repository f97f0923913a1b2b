"""The operational endpoints: /healthz, /readyz, /metrics and /openapi.json."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from aio_pika.abc import AbstractRobustConnection
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client.aiohttp import make_aiohttp_handler
from redis.asyncio import Redis
from redis.exceptions import RedisError

from outbox.stream import oldest_entry_age
from service.appkeys import AMQP, METRICS, REDIS, SETTINGS
from service.openapi import spec_json
from service.replies import Reply, info_reply
from session_close import amqp
from session_close.keys import Keys

log = logging.getLogger(__name__)


async def healthz(request: web.Request) -> web.Response:
    return info_reply(request, Reply.ALIVE)


def _amqp_open(task: asyncio.Task[AbstractRobustConnection]) -> bool:
    if not task.done() or task.cancelled() or task.exception() is not None:
        return False
    return amqp.is_open(task.result())


@dataclass(frozen=True, slots=True)
class Dependencies:
    redis_up: bool
    redis_writes_up: bool
    rabbitmq_up: bool
    outbox_backlog: int

    def body(self) -> dict[str, object]:
        return {
            "redis": "up" if self.redis_up else "down",
            "redisWrites": "up" if self.redis_writes_up else "down",
            "rabbitmq": "up" if self.rabbitmq_up else "down",
            "outboxBacklog": self.outbox_backlog,
        }


async def check_dependencies(app: web.Application) -> Dependencies:
    """What /readyz and /metrics report; records it in the metrics."""
    settings = app[SETTINGS]
    pending: int | None = None
    writes = False
    try:
        async with asyncio.timeout(settings.redis_timeout_seconds):
            pending, writes = await _redis_state(app[REDIS], Keys(settings.redis_key_prefix))
    except (RedisError, OSError, TimeoutError) as exc:
        log.warning("Redis unreachable", extra={"error": repr(exc)})
    rabbitmq_up = _amqp_open(app[AMQP])
    last = app[METRICS].dependencies(
        redis_up=pending is not None,
        redis_writes_up=writes,
        rabbitmq_up=rabbitmq_up,
        backlog=pending,
    )
    return Dependencies(pending is not None, writes, rabbitmq_up, last)


async def _redis_state(redis: Redis, keys: Keys) -> tuple[int | None, bool]:
    """The outbox backlog, over every bucket (None when Redis answered it with an
    error), and whether Redis takes writes; one round trip to each node."""
    pipe = redis.pipeline(transaction=False)
    for outbox in keys.outboxes:
        pipe.xlen(outbox)  # answers only when Redis does, so it doubles as the ping
    # A write that changes nothing and needs no memory: Redis refuses it when it refuses
    # the closes' writes (MISCONF, READONLY, NOREPLICAS) and, like a close, whose first
    # write is a DEL, takes it when it is full.
    pipe.delete(keys.write_check)
    *lengths, deleted = await pipe.execute(raise_on_error=False)
    if isinstance(deleted, Exception):
        log.warning("Redis refuses writes", extra={"error": repr(deleted)})
    failed = next((length for length in lengths if isinstance(length, Exception)), None)
    if failed is not None:
        log.warning("Redis cannot read the outbox", extra={"error": repr(failed)})
        return None, not isinstance(deleted, Exception)
    return sum(int(length) for length in lengths), not isinstance(deleted, Exception)


async def readyz(request: web.Request) -> web.Response:
    # Ready means "can close sessions": Redis answers and takes writes. RabbitMQ and the
    # backlog are reported only: a probe failing on them would take every pod out of the
    # Service during a broker outage, exactly while the outbox carries the closes.
    seen = await check_dependencies(request.app)
    ready = seen.redis_up and seen.redis_writes_up
    reply = Reply.READY if ready else Reply.NOT_READY
    return info_reply(request, reply, beside=seen.body())


async def read_scraped_values(app: web.Application) -> None:
    """The values read at scrape time. A scrape while Redis is away still answers; the
    backlog keeps its last value. So does a scrape whatever the outbox holds (ValueError:
    a reply that cannot be read)."""
    await check_dependencies(app)
    settings = app[SETTINGS]
    with contextlib.suppress(RedisError, OSError, TimeoutError, ValueError):
        async with asyncio.timeout(settings.redis_timeout_seconds):
            age = await oldest_entry_age(app[REDIS], Keys(settings.redis_key_prefix))
        app[METRICS].outbox.oldest_age.set(age)


def scrape_handler(app: web.Application) -> Handler:
    """/metrics: prometheus_client's own handler (the format the scraper accepts, text or
    OpenMetrics, compressed when it asks), after the values read at scrape time."""
    render = make_aiohttp_handler(app[METRICS].registry)

    async def scrape(request: web.Request) -> web.StreamResponse:
        await read_scraped_values(app)  # also when served by metrics_app on its own port
        return await render(request)

    return scrape


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=spec_json(), content_type="application/json")
