"""The transmitter process (`python -m signals`): its intake worker on its own quorum
queue, the delivery loop, the retention purge, and its HTTP port (SIGNALS_HTTP_PORT) with
the SSF endpoints (signals/ssf.py), /healthz, /readyz and /metrics.

SIGTERM: the intake stops consuming and settles what it holds (the worker's own
shutdown), the delivery loop takes nothing more and lets the attempts in flight finish
within SHUTDOWN_TIMEOUT_SECONDS, then the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import aiohttp
import asyncpg
import orjson
from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from session_close.postgres import DB_TIMEOUT_SECONDS, TRANSIENT
from session_close.retry import pause, retry
from session_close.runtime import tune_gc
from session_close.settings import Settings
from session_close.topology import TRANSMITTER
from signals.delivery import Deliverer
from signals.intake import open_intake
from signals.metrics import SignalsMetrics
from signals.schema import migrate_database
from signals.sets import Signer
from signals.ssf import MAX_BODY_BYTES, SsfApi, ssf_errors
from signals.store import Store, open_pool
from signals.urls import PublicResolver
from workers.metrics import WorkerMetrics
from workers.runner import Worker

log = logging.getLogger(__name__)

PURGE_EVERY_SECONDS = 60.0


def _dumps(value: object) -> str:
    return orjson.dumps(value).decode()


def transmitter_app(
    store: Store,
    pool: asyncpg.Pool,
    worker: Worker,
    metrics: SignalsMetrics,
    tasks: list[asyncio.Task[None]],
    ssf: SsfApi,
) -> web.Application:
    render = make_aiohttp_handler(worker.metrics.registry)

    async def healthz(request: web.Request) -> web.Response:
        # The loop's own heartbeat (the worker beats on it), and its work still running.
        age = worker.metrics.heartbeat_age()
        alive = age <= worker.metrics.stale_after and not any(t.done() for t in tasks)
        body = {"alive": alive, "heartbeatAgeSeconds": round(age, 3)}
        return web.json_response(body, status=200 if alive else 503, dumps=_dumps)

    async def readyz(request: web.Request) -> web.Response:
        checks = {"amqp": "ok" if worker.consuming.is_set() else "unavailable"}
        try:
            async with asyncio.timeout(DB_TIMEOUT_SECONDS):
                await pool.fetchval("SELECT 1")
            checks["postgres"] = "ok"
        except TRANSIENT:
            checks["postgres"] = "unavailable"
        ready = all(value == "ok" for value in checks.values())
        body = {"status": "ready" if ready else "unavailable", "checks": checks}
        return web.json_response(body, status=200 if ready else 503, dumps=_dumps)

    async def scrape(request: web.Request) -> web.StreamResponse:
        # The backlog as PostgreSQL has it now; while it is away the last values stay.
        with contextlib.suppress(*TRANSIENT):
            async with asyncio.timeout(DB_TIMEOUT_SECONDS):
                metrics.backlog(await store.backlog())
        return await render(request)

    app = web.Application(middlewares=[ssf_errors], client_max_size=MAX_BODY_BYTES)
    ssf.routes(app)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", scrape)
    return app


async def purge_forever(store: Store, retention_seconds: int) -> None:
    while True:
        with contextlib.suppress(*TRANSIENT):
            if removed := await store.purge(retention_seconds):
                log.info("signals forgot events past retention", extra={"events": removed})
        await pause(PURGE_EVERY_SECONDS)


async def run_transmitter(settings: Settings, signer: Signer) -> None:
    await retry(
        "migrating the signals schema", lambda: migrate_database(settings), transient=TRANSIENT
    )
    async with contextlib.AsyncExitStack() as stack:
        pool = await stack.enter_async_context(open_pool(settings))
        store = Store(pool)
        # The intake's worker series and the deliveries' share one registry (/metrics).
        worker_metrics = WorkerMetrics(TRANSMITTER)
        metrics = SignalsMetrics(worker_metrics.registry)
        session = await stack.enter_async_context(
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=0,
                    resolver=None if settings.signals_allow_http else PublicResolver(),
                ),
                headers={"User-Agent": "eliab-session-close-signals"},
            )
        )
        deliverer = Deliverer(store, metrics, session, signer, settings.signals_issuer)
        worker = Worker(
            settings, TRANSMITTER, open_intake(store, deliverer.wake), metrics=worker_metrics
        )
        ssf = SsfApi(
            store,
            signer,
            metrics,
            issuer=settings.signals_issuer,
            allow_http=settings.signals_allow_http,
        )
        tasks = [
            asyncio.create_task(worker.run(), name="signals-intake"),
            asyncio.create_task(
                deliverer.run(settings.shutdown_timeout_seconds), name="signals-delivery"
            ),
        ]
        purging = asyncio.create_task(purge_forever(store, settings.signals_retention_seconds))
        runner = web.AppRunner(
            transmitter_app(store, pool, worker, metrics, tasks, ssf), access_log=None
        )
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, settings.signals_http_host, settings.signals_http_port)
        await site.start()
        log.info("signals listening", extra={"port": int(runner.addresses[0][1])})

        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        tune_gc()
        waiting = asyncio.create_task(stopping.wait())
        await asyncio.wait([waiting, *tasks], return_when=asyncio.FIRST_COMPLETED)
        worker.stop()
        deliverer.stop()
        purging.cancel()
        waiting.cancel()
        ended = await asyncio.gather(*tasks, purging, return_exceptions=True)
        worker.metrics.close()
    failed = [e for e in ended if isinstance(e, Exception)]
    if failed and not stopping.is_set():
        raise failed[0]  # the work ended by itself: exit non-zero, to be restarted
    log.info("signals stopped")
