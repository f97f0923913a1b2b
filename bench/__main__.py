"""`python -m bench [load|sustained|soak]`: see the README section "Benchmarks"."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import tempfile
import time
from pathlib import Path

from session_close import __version__
from session_close.logs import configure_logging
from session_close.settings import Settings, env_help, settings_or_exit

log = logging.getLogger("bench")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmarks of POST /v1.0/session/close on 127.0.0.1, each run on its own "
        "Redis prefix, exchange, queues and audit table, all removed at the end. "
        "load: wrk at N connections against the API (relay in-process) and a bare aiohttp "
        "endpoint, then the relay's drain rate. sustained: a fixed rate with the relay and "
        "both workers, end-to-end latency to the audit row and exactly-once checks. "
        "soak: many closes in rounds, RSS and outbox length per round. expiry: the sweeper "
        "working off a 100,000-session backlog while closes run, and the delay from "
        "expires_at to the session.expired event in RabbitMQ. consumers: CPU per event of a bare "
        "aio-pika consumer (the anchor) and of both workers draining the same events. signals: "
        "the transmitter's deliveries/s and CPU per delivery to a local webhook, and "
        "close-to-receipt latency at a steady rate of closes.",
        epilog=env_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "mode",
        choices=["load", "consumers", "sustained", "soak", "expiry", "signals"],
        nargs="?",
        default="load",
    )
    parser.add_argument("--seconds", type=float, help="load: per endpoint (10); sustained (30)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    parser.add_argument("--relay-entries", type=int, default=50_000, help="load: outbox fill")
    parser.add_argument(
        "--rate", type=float, help="sustained, expiry: closes/s (1000); signals (200)"
    )
    parser.add_argument(
        "--events", type=int, help="consumers: events per round (20000); signals: drained (5000)"
    )
    parser.add_argument("--rounds", type=int, help="consumers: rounds (3); sustained: runs (3)")
    parser.add_argument("--closes", type=int, default=200_000, help="soak: total closes")
    parser.add_argument(
        "--profile",
        type=Path,
        help="load: sample the API with py-spy during the measured run into this file "
        "(folded stacks; flamegraph.pl or speedscope read it)",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs")
    return parser.parse_args(argv)


async def main_async(args: argparse.Namespace, settings: Settings, workdir: Path) -> str:
    from bench.stack import Stack

    stack = Stack(settings, workdir)
    try:
        if args.mode == "load":
            from bench import load

            result = await load.run(
                stack,
                seconds=args.seconds or 10.0,
                connections=args.connections,
                relay_entries=args.relay_entries,
                profile=args.profile,
            )
            return load.render(result, args.connections)
        if args.mode == "consumers":
            from bench import consumer

            events = args.events or 20_000
            drains = await consumer.run(stack, events=events, rounds=args.rounds or 3)
            return consumer.render(drains, events)
        if args.mode == "signals":
            from bench import signals

            sresult = await signals.run(
                stack,
                events=args.events or 5_000,
                rate=args.rate or 200.0,
                seconds=args.seconds or 10.0,
            )
            return signals.render(sresult)
        if args.mode == "sustained":
            from bench import sustained

            results = []
            for run in range(args.rounds or 3):
                if run:  # each run on names of its own, the last one's removed
                    await stack.close()
                    stack = Stack(settings, workdir)
                results.append(
                    await sustained.run(
                        stack,
                        rate=args.rate or 1000.0,
                        seconds=args.seconds or 30.0,
                        connections=args.connections,
                    )
                )
                log.info("sustained run done", extra={"run": run + 1})
            return sustained.render_rounds(results)
        if args.mode == "expiry":
            from bench import expiry

            eresult = await expiry.run(
                stack,
                rate=args.rate or 1000.0,
                seconds=args.seconds or 10.0,
                connections=args.connections,
            )
            return expiry.render(eresult)
        from bench import soak

        rounds = await soak.run(stack, closes=args.closes, connections=args.connections)
        return soak.render(rounds)
    finally:
        await stack.close()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging("INFO", for_humans=True)
    settings = settings_or_exit("python -m bench")

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through Stack.close()

    signal.signal(signal.SIGTERM, terminate)
    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    # The numbers are only as good as the machine is quiet; say how quiet it was.
    log.info("load average before the run", extra={"load_average": os.getloadavg()})
    started = time.monotonic()
    ok = False
    try:
        import uvloop

        print(uvloop.run(main_async(args, settings, workdir)))
        ok = True
    finally:
        log.info(
            "bench done",
            extra={
                "mode": args.mode,
                "seconds": round(time.monotonic() - started),
                "logs": str(workdir),
            },
        )
        if ok and not args.keep_logs:
            for path in workdir.iterdir():
                path.unlink()
            workdir.rmdir()


if __name__ == "__main__":
    main()
