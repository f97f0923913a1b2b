"""`python -m signals` runs the transmitter until SIGTERM; `python -m signals migrate`
creates or updates its tables in SIGNALS_DB_SCHEMA and exits; `python -m signals keygen
FILE` writes a new RSA signing key to FILE unless it exists (local runs, demos)."""

from __future__ import annotations

import argparse
import sys

from session_close import __version__
from session_close.logs import configure_logging
from session_close.settings import env_help, settings_or_exit

PROG = "python -m signals"


def parse_args(argv: list[str] | None, prog: str = PROG) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="The transmitter of session ends to receivers that do not speak AMQP: "
        "OpenID Shared Signals (CAEP session-revoked, push and poll) and Standard Webhooks. "
        "Without a command it runs until SIGTERM.",
        epilog=env_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "command",
        nargs="?",
        choices=["run", "migrate", "keygen"],
        default="run",
        help="run (the default); migrate: apply the schema migrations SIGNALS_DB_SCHEMA "
        "lacks, print them, and exit; keygen FILE: write a new 3072-bit RSA signing key "
        "(PEM, mode 600) to FILE unless it exists",
    )
    parser.add_argument("file", nargs="?", help="keygen's key file")
    args = parser.parse_args(argv)
    if (args.command == "keygen") != (args.file is not None):
        parser.error("a FILE goes with keygen, and only with it")
    return args


def main(argv: list[str] | None = None, prog: str = PROG) -> None:
    args = parse_args(argv, prog)
    if args.command == "keygen":
        from signals.sets import write_new_key

        made = write_new_key(args.file)
        print(f"{'wrote a new signing key to' if made else 'kept the signing key in'} {args.file}")
        return
    settings = settings_or_exit(prog)
    configure_logging(settings.log_level)
    import uvloop

    if args.command == "migrate":
        from signals.schema import migrate_database

        applied = uvloop.run(migrate_database(settings))
        for migration in applied:
            print(f"applied {migration.version}: {migration.description}")
        print(
            f"schema {settings.signals_db_schema} is at version {applied[-1].version}"
            if applied
            else f"schema {settings.signals_db_schema} was up to date"
        )
        return

    from session_close import tracing
    from signals.app import run_transmitter
    from signals.sets import Signer, SigningKeyError

    if settings.signals_issuer.startswith("http://") and not settings.signals_allow_http:
        sys.exit(f"{prog}: SIGNALS_ISSUER must be https (http only with SIGNALS_ALLOW_HTTP=true)")
    try:
        signer = Signer.from_files(settings.signals_signing_key_files)
    except SigningKeyError as exc:
        sys.exit(f"{prog}: SIGNALS_SIGNING_KEY_FILES: {exc}")
    tracing.configure("session-close-signals")
    uvloop.run(run_transmitter(settings, signer))


def console_main() -> None:
    """The `session-signals` console script: the same, under its own name."""
    main(prog="session-signals")


if __name__ == "__main__":
    main()
