"""`python -m workers audit|push-cleanup` runs one worker until SIGTERM;
`python -m workers replay-dlq audit|push-cleanup|signals [--limit N]` moves dead-lettered
messages back to the worker's (or the transmitter's) queue."""

from __future__ import annotations

import argparse
import dataclasses

from session_close import __version__, tracing
from session_close.logs import configure_logging
from session_close.settings import env_help, settings_or_exit
from session_close.topology import TRANSMITTER, WORKERS


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("must be a port number")
    return value


PROG = "python -m workers"


def parse_args(argv: list[str] | None, prog: str = PROG) -> argparse.Namespace:
    common = {"epilog": env_help(), "formatter_class": argparse.RawDescriptionHelpFormatter}
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Consumers of the session events (session.closed, session.expired).",
        **common,  # type: ignore[arg-type]
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, text in (
        ("audit", "write one PostgreSQL row (AUDIT_TABLE) per event"),
        ("push-cleanup", "remove the closed session's push tokens from Redis"),
    ):
        worker = commands.add_parser(name, help=text, description=text, **common)  # type: ignore[arg-type]
        worker.add_argument(
            "--prefetch",
            type=_positive,
            help="messages the broker hands over at once (overrides WORKER_PREFETCH)",
        )
        worker.add_argument(
            "--concurrency",
            type=_positive,
            help="messages worked on at once, and the largest batch (overrides WORKER_CONCURRENCY)",
        )
        worker.add_argument(
            "--metrics-port",
            type=_port,
            help="serve Prometheus metrics on this port "
            "(overrides WORKER_METRICS_PORT; off by default)",
        )
    replay = commands.add_parser(
        "replay-dlq",
        help="move dead-lettered messages back to a worker's queue",
        description="Move the messages of <queue>.dlq back to <queue>, body and properties "
        "unchanged, publishing with confirms before removing each from the dead-letter queue.",
        **common,  # type: ignore[arg-type]
    )
    replay.add_argument("worker", choices=(*WORKERS, TRANSMITTER))
    replay.add_argument("--limit", type=_positive, help="move at most N messages")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, prog: str = PROG) -> None:
    args = parse_args(argv, prog)
    settings = settings_or_exit(prog)
    configure_logging(settings.log_level)
    import uvloop

    if args.command == "replay-dlq":
        from workers.replay import replay_dead_letters

        moved = uvloop.run(replay_dead_letters(settings, args.worker, args.limit))
        print(f"replayed {moved} messages")
        return

    overrides = {
        "worker_prefetch": args.prefetch,
        "worker_concurrency": args.concurrency,
        "worker_metrics_port": args.metrics_port,
    }
    settings = dataclasses.replace(
        settings, **{k: v for k, v in overrides.items() if v is not None}
    )
    tracing.configure(f"session-close-{args.command}")
    from workers.runner import run_worker

    if args.command == "audit":
        from workers.audit import open_audit

        uvloop.run(run_worker(settings, "audit", open_audit))
    else:
        from workers.push_cleanup import open_push_cleanup

        uvloop.run(run_worker(settings, "push-cleanup", open_push_cleanup))


def console_main() -> None:
    """The `session-workers` console script: the same, under its own name."""
    main(prog="session-workers")


if __name__ == "__main__":
    main()
