"""`python -m outbox relay` runs the outbox relay alone, `python -m outbox sweeper` the
expiry sweeper alone, each until SIGTERM/SIGINT. `python -m service` hosts both by
default; these are for running them apart (RELAY_ENABLED / SWEEPER_ENABLED false on the
API)."""

from __future__ import annotations

import argparse

from session_close import __version__, tracing
from session_close.logs import configure_logging
from session_close.settings import env_help, settings_or_exit

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

    if args.command == "relay":
        from outbox.relay import run_standalone
    else:
        from outbox.sweeper import run_standalone
    uvloop.run(run_standalone(settings))


def console_main() -> None:
    """The `session-outbox` console script: the same, under its own name."""
    main(prog="session-outbox")


if __name__ == "__main__":
    main()
