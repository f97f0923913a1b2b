"""`python -m outbox relay` runs the outbox relay alone, `python -m outbox sweeper` the
expiry sweeper alone, each until SIGTERM/SIGINT. `python -m service` hosts both by
default; these are for running them apart (RELAY_ENABLED / SWEEPER_ENABLED false on the
API)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from outbox.probes import Liveness, outbox_registry, serving_probes
from outbox.relay import Relay, open_exchange
from outbox.sweeper import Sweeper
from outbox.sweeper import stop as stop_sweeper
from session_close import __version__, tracing
from session_close.amqp import connect_and_declare
from session_close.logs import configure_logging
from session_close.redis_client import connect_redis
from session_close.runtime import tune_gc
from session_close.settings import Settings, env_help, settings_or_exit

log = logging.getLogger(__name__)

PROG = "python -m outbox"


def parse_args(argv: list[str] | None, prog: str = PROG) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="The outbox's processes apart from the API: the relay publishing the "
        "session events to RabbitMQ, the sweeper recording session.expired events.",
        epilog=env_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "command",
        choices=["relay", "sweeper"],
        help="relay: publish the outbox to RabbitMQ; sweeper: record session.expired "
        "events for sessions past their expires_at",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, prog: str = PROG) -> None:
    args = parse_args(argv, prog)
    settings = settings_or_exit(prog)
    configure_logging(settings.log_level)
    tracing.configure(f"session-close-{args.command}")
    import uvloop

    uvloop.run(run_relay(settings) if args.command == "relay" else run_sweeper(settings))


async def run_relay(settings: Settings) -> None:
    """The relay as its own process (`python -m outbox relay`), until SIGTERM/SIGINT.
    /healthz and /metrics are served from the start, while RabbitMQ is still awaited."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    redis = connect_redis(settings, resend=False)
    registry, metrics = outbox_registry()
    liveness = Liveness()
    async with serving_probes(settings, redis, liveness, registry, metrics):
        connect = asyncio.create_task(connect_and_declare(settings))
        await asyncio.wait(
            [connect, asyncio.create_task(stop.wait())], return_when="FIRST_COMPLETED"
        )
        if not connect.done():
            connect.cancel()
            await redis.aclose()
            return
        connection = connect.result()
        exchange = await open_exchange(connection, settings)
        relay = Relay(
            redis,
            settings,
            on_published=metrics.relay_published,
            on_failed=metrics.relay_failed,
            on_dead_lettered=metrics.relay_dead_lettered,
        )
        tune_gc()
        task = liveness.work = asyncio.create_task(relay.run(exchange))
        log.info("outbox relay running")
        await stop.wait()
        await relay.stop(task)
    await connection.close()
    await redis.aclose()


async def run_sweeper(settings: Settings) -> None:
    """The sweeper as its own process (`python -m outbox sweeper`), until SIGTERM/SIGINT.
    Its events wait in the outbox for the relays."""
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    redis = connect_redis(settings)
    registry, metrics = outbox_registry()
    liveness = Liveness()
    async with serving_probes(settings, redis, liveness, registry, metrics):
        sweeper = Sweeper(redis, settings, on_sweep=metrics.sweep)
        task = liveness.work = asyncio.create_task(sweeper.run())
        tune_gc()
        log.info("expiry sweeper running")
        await stop_requested.wait()
        await stop_sweeper(task)
    await redis.aclose()


def console_main() -> None:
    """The `session-outbox` console script: the same, under its own name."""
    main(prog="session-outbox")


if __name__ == "__main__":
    main()
