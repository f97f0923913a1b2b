"""The application factory, used by `python -m service` and by the tests alike."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web
from redis.exceptions import RedisError

from service.appkeys import AMQP, CLOSER, METRICS, REDIS, RELAY, SETTINGS
from service.closer import SessionCloser
from service.handlers import close_all_sessions, close_session
from service.middlewares import info_replies, whole_requests
from service.ops import measure_requests, setup_ops
from service.relay import Relay, ensure_group, open_exchange
from service.schemas import MAX_BODY_BYTES
from service.sweeper import Sweeper
from service.sweeper import stop as stop_sweeper
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


async def relay_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    metrics = app[METRICS]
    relay = app[RELAY] = Relay(
        app[REDIS],
        settings,
        on_published=metrics.relay_published_n,
        on_failed=metrics.relay_failed_n,
    )

    async def run() -> None:
        # shield: stopping the relay must not cancel the shared connect task
        connection = await asyncio.shield(app[AMQP])
        await relay.run(await open_exchange(connection, settings))

    task = asyncio.create_task(run(), name="outbox-relay")
    yield
    await relay.stop(task)


async def sweeper_ctx(app: web.Application) -> AsyncIterator[None]:
    sweeper = Sweeper(app[REDIS], app[SETTINGS], on_sweep=app[METRICS].sweep)
    task = asyncio.create_task(sweeper.run(), name="expiry-sweeper")
    yield
    await stop_sweeper(task)


def create_app(settings: Settings) -> web.Application:
    # measure_requests comes first so it sees the reply info_replies made of any failure,
    # whole_requests last so that info_replies answers its failures too.
    app = web.Application(
        client_max_size=MAX_BODY_BYTES,
        middlewares=[measure_requests, info_replies, whole_requests],
    )
    app[SETTINGS] = settings
    app.cleanup_ctx.append(redis_ctx)
    app.cleanup_ctx.append(amqp_ctx)
    if settings.relay_enabled:
        app.cleanup_ctx.append(relay_ctx)
    if settings.sweeper_enabled:
        app.cleanup_ctx.append(sweeper_ctx)
    app.router.add_post("/v1.0/session/close", close_session)
    app.router.add_post("/v1.0/session/close-all", close_all_sessions)
    setup_ops(app)
    return app
