"""The application factory, used by `python -m service` and by the tests alike."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web
from redis.exceptions import RedisError

from outbox.relay import Relay, open_exchange
from outbox.stream import ensure_group
from outbox.sweeper import Sweeper
from outbox.sweeper import stop as stop_sweeper
from service.appkeys import AMQP, CLOSER, METRICS, REDIS, SETTINGS
from service.closer import SessionCloser
from service.metrics import Metrics
from service.middlewares import setup_middlewares
from service.routes import metrics_app, setup_routes
from service.schemas import MAX_BODY_BYTES
from session_close import amqp
from session_close.keys import Keys
from session_close.redis_client import connect_redis, warn_unless_durable
from session_close.scripts import CLOSE_SESSIONS
from session_close.settings import Settings

log = logging.getLogger(__name__)


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    redis = app[REDIS] = connect_redis(settings)
    try:
        await CLOSE_SESSIONS.load(redis)
        await ensure_group(redis, Keys(settings.redis_key_prefix))
    except (RedisError, OSError) as exc:
        # Serve anyway: closes answer 503 until Redis is back, then work with no restart.
        log.warning("Redis unreachable at start", extra={"error": repr(exc)})
    else:
        await warn_unless_durable(redis)
    closer = app[CLOSER] = SessionCloser(redis, settings)
    yield
    await closer.drain()
    await redis.aclose()


async def amqp_ctx(app: web.Application) -> AsyncIterator[None]:
    # Connecting waits for the broker in the background: while RabbitMQ is down the API
    # still closes sessions, and their events wait in the outbox.
    task = app[AMQP] = asyncio.create_task(amqp.connect_and_declare(app[SETTINGS]))
    yield
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    elif not task.cancelled() and task.exception() is None:
        await task.result().close()


async def metrics_port_ctx(app: web.Application) -> AsyncIterator[None]:
    """/metrics on METRICS_PORT, by a server of its own: scrapers reach it, the Service
    that publishes the API does not."""
    settings = app[SETTINGS]
    runner = web.AppRunner(metrics_app(app), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.http_host, settings.metrics_port)
        await site.start()
        port = runner.addresses[0][1]  # the one the OS chose when asked for port 0
        log.info("serving metrics", extra={"host": settings.http_host, "port": port})
        yield
    finally:
        await runner.cleanup()


async def relay_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    metrics = app[METRICS].outbox
    # A client of its own that never re-sends a command (session_close/redis_client.py).
    redis = connect_redis(settings, resend=False)
    relay = Relay(
        redis,
        settings,
        on_published=metrics.relay_published,
        on_failed=metrics.relay_failed,
        on_dead_lettered=metrics.relay_dead_lettered,
    )

    async def run() -> None:
        # shield: stopping the relay must not cancel the shared connect task
        connection = await asyncio.shield(app[AMQP])
        await relay.run(await open_exchange(connection, settings))

    task = asyncio.create_task(run(), name="outbox-relay")
    yield
    await relay.stop(task)
    await redis.aclose()


async def sweeper_ctx(app: web.Application) -> AsyncIterator[None]:
    sweeper = Sweeper(app[REDIS], app[SETTINGS], on_sweep=app[METRICS].outbox.sweep)
    task = asyncio.create_task(sweeper.run(), name="expiry-sweeper")
    yield
    await stop_sweeper(task)


def create_app(settings: Settings) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app.cleanup_ctx.append(redis_ctx)
    app.cleanup_ctx.append(amqp_ctx)
    if settings.metrics_port is not None:
        app.cleanup_ctx.append(metrics_port_ctx)  # scrapes read Redis and the broker's state
    if settings.relay_enabled:
        app.cleanup_ctx.append(relay_ctx)
    if settings.sweeper_enabled:
        app.cleanup_ctx.append(sweeper_ctx)
    setup_middlewares(app)
    setup_routes(app)
    return app
