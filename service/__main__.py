"""`python -m service` runs the API, with its outbox relay unless RELAY_ENABLED=false and
its expiry sweeper unless SWEEPER_ENABLED=false (`python -m outbox` runs either alone)."""

from __future__ import annotations

import argparse

from aiohttp import web

from session_close import __version__, tracing
from session_close.logs import configure_logging
from session_close.runtime import tune_gc
from session_close.settings import env_help, settings_or_exit

PROG = "python -m service"


def parse_args(argv: list[str] | None, prog: str = PROG) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Session close API: POST /v1.0/session/close and /v1.0/session/close-all, "
        "/healthz, /readyz, /metrics, /openapi.json; with the outbox relay publishing the "
        "session events and the sweeper recording session.expired ones, unless "
        "RELAY_ENABLED / SWEEPER_ENABLED are false.",
        epilog=env_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, prog: str = PROG) -> None:
    parse_args(argv, prog)
    settings = settings_or_exit(prog)
    configure_logging(settings.log_level)
    tracing.configure("session-close-api")  # its in-process relay's spans too
    import uvloop

    from service.app import create_app
    from service.server import serve

    app = create_app(settings)
    app.on_startup.append(tune_gc_after_startup)  # after the cleanup contexts' setup
    uvloop.run(serve(app, settings))


def console_main() -> None:
    """The `session-service` console script: the same, under its own name."""
    main(prog="session-service")


async def tune_gc_after_startup(app: web.Application) -> None:
    tune_gc()


if __name__ == "__main__":
    main()
