"""Every piece of typed application and request state, declared in one place."""

from __future__ import annotations

import asyncio

from aio_pika.abc import AbstractRobustConnection
from aiohttp import web
from redis.asyncio import Redis

from service.closer import SessionCloser
from service.metrics import Metrics
from session_close.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
REDIS = web.AppKey("redis", Redis)
CLOSER = web.AppKey("closer", SessionCloser)
# Done once RabbitMQ was first reached and the topology declared; the API serves
# closes (their events wait in the outbox) before that.
AMQP = web.AppKey("amqp", asyncio.Task[AbstractRobustConnection])
# Per app, not module-global: tests build many apps in one process.
METRICS = web.AppKey("metrics", Metrics)

REQUEST_ID = web.RequestKey("request_id", str)
# time.perf_counter() when the app got the request: uvloop's clock, which aiohttp hands
# the access logger, counts whole milliseconds.
REQUEST_STARTED = web.RequestKey("request_started", float)
# With tracing on, on the session routes: the server span's traceparent (the event's)
# and its trace_id and span_id (the access line's, written after the span ended).
TRACEPARENT = web.RequestKey("traceparent", str)
TRACE_IDS = web.RequestKey("trace_ids", dict[str, str])
