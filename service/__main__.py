"""`python -m service` runs the API (with its outbox relay unless RELAY_ENABLED=false,
and its expiry sweeper unless SWEEPER_ENABLED=false); `python -m service relay` runs the
outbox relay alone, `python -m service sweeper` the expiry sweeper alone."""

from __future__ import annotations

import argparse
import dataclasses

from aiohttp import web

from session_close import __version__
from session_close.logs import configure_logging
from session_close.runtime import tune_gc
from session_close.settings import env_help, settings_or_exit


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="Session close API: POST /v1.0/session/close and /v1.0/session/close-all, "
        "/healthz, /readyz, /metrics, /openapi.json; with the outbox relay publishing the "
        "session events and the sweeper recording session.expired ones.",
        epilog=env_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "command",
        nargs="?",
        choices=["api", "relay", "sweeper"],
        default="api",
        help="api (default): serve HTTP, relay and sweeper included unless RELAY_ENABLED / "
        "SWEEPER_ENABLED are false; relay: only publish the outbox to RabbitMQ; sweeper: "
        "only record session.expired events for sessions past their expires_at",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--no-relay", action="store_true", help="serve HTTP without the relay")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = settings_or_exit("python -m service")
    configure_logging(settings.log_level)
    import uvloop

    if args.command == "relay":
        from service.relay import run_standalone

        uvloop.run(run_standalone(settings))
        return
    if args.command == "sweeper":
        from service.sweeper import run_standalone as run_sweeper

        uvloop.run(run_sweeper(settings))
        return

    from service.app import create_app
    from service.server import serve

    if args.no_relay:
        settings = dataclasses.replace(settings, relay_enabled=False)
    app = create_app(settings)
    app.on_startup.append(tune_gc_after_startup)  # after the cleanup contexts' setup
    uvloop.run(serve(app, settings))


async def tune_gc_after_startup(app: web.Application) -> None:
    tune_gc()


if __name__ == "__main__":
    main()
