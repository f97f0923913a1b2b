"""`python -m service` runs the API (with its outbox relay unless RELAY_ENABLED=false);
`python -m service relay` runs the outbox relay alone."""

from __future__ import annotations

import argparse
import dataclasses

from aiohttp import web

from session_close.logs import configure_logging
from session_close.runtime import tune_gc
from session_close.settings import env_help, settings_or_exit


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="Session close API: POST /v1.0/session/close, /healthz, /readyz, "
        "/metrics, /openapi.json; with the outbox relay publishing session.closed events.",
        epilog=env_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "command",
        nargs="?",
        choices=["api", "relay"],
        default="api",
        help="api (default): serve HTTP, relay included unless RELAY_ENABLED=false; "
        "relay: only publish the outbox to RabbitMQ",
    )
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
