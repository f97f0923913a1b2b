"""Mutation check of the guarantees: `make mutants`.

Each mutant below breaks one guarantee with a small edit of the source, and names the
tests that should notice. The script copies the repository to a temporary directory,
applies one mutant at a time there (the original is never touched), runs only its tests
against the copy, and prints one line per mutant:

    killed   <name>  (<seconds>s, by <first failing test>)
    SURVIVED <name>
    NOT APPLIED <name>: <why>

then `N of M mutants killed`; it exits 1 unless every mutant was killed. An edit whose
text does not occur exactly once "does not apply": code that moved or changed under a
mutant is reported, not silently skipped. Before any mutant, the union of the selected
tests must pass on the unmutated copy, so that no mutant is "killed" by a test that
fails anyway.

    python scripts/mutants.py                 # all mutants
    python scripts/mutants.py --list          # the table, with each mutant's tests
    python scripts/mutants.py --only timeout  # those whose name contains a text
    python scripts/mutants.py --skip NUL      # all but those (repeatable, like --only)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Bounds one pytest run, so a mutant that hangs past pytest's own per-test timeout (or
# hangs a process the tests started) cannot hold up CI; such a mutant counts as killed.
RUN_TIMEOUT_SECONDS = 180.0
CACHES = {"__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis"}
# What `make` and local runs leave at the top (see .gitignore): not code, maybe large.
LOCAL = {".git", ".venv", "build", "run", "bench/results"}


def not_copied(directory: str, names: list[str]) -> set[str]:
    here = Path(directory).relative_to(ROOT)
    return {
        name
        for name in names
        if name in CACHES or name.endswith(".egg-info") or (here / name).as_posix() in LOCAL
    }


@dataclass(frozen=True)
class Edit:
    """Replace `find`, which must occur exactly once in the file, with `replace`."""

    find: str
    replace: str


@dataclass(frozen=True)
class Mutant:
    """A guarantee broken by `edits` to `file`, and the pytest node ids that should fail."""

    name: str
    file: str
    edits: tuple[Edit, ...]
    tests: tuple[str, ...]


RELAY = "outbox/relay.py"
CLOSE_SCRIPT = "session_close/lua/close_sessions.lua"
CLOSE_ALL_SCRIPT = "session_close/lua/close_all_sessions.lua"
SWEEP_SCRIPT = "session_close/lua/sweep_expired.lua"
RUNNER = "workers/runner.py"
OUTBOX = "tests/outbox/test_relay.py::test_"
IDEMPOTENCY = "tests/api/test_close_idempotency.py::test_"
CLOSE_ALL = "tests/api/test_close_all.py::test_"
SWEEPER = "tests/outbox/test_sweeper.py::test_"
POISON = "tests/workers/test_poison.py::test_"
HYGIENE = "tests/api/test_http_hygiene.py::test_"

MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "close answers 500 (self-check: the API started as a child process runs the copy)",
        "service/handlers.py",
        edits=(
            Edit(
                "    if request.content_length is not None and",
                "    return web.Response(status=500)\n"
                "    if request.content_length is not None and",
            ),
        ),
        tests=(
            "tests/api/test_ops_process.py::test_access_log_is_one_json_line_per_request_without_secrets",
        ),
    ),
    # The outbox and its relay: no event lost, none stranded, none unconfirmed.
    Mutant(
        "relay drops entries while the broker is down",
        RELAY,
        edits=(
            Edit(
                "            self._on_failed(len(entries))\n",
                "            await self._redis.xdel(self._keys.outbox, *(e for e, _ in entries))\n"
                "            self._on_failed(len(entries))\n",
            ),
        ),
        tests=(
            f"{OUTBOX}closes_succeed_while_rabbitmq_is_down_and_the_backlog_drains_after[reset]",
        ),
    ),
    Mutant(
        "no takeover of a dead relay's entries",
        RELAY,
        edits=(Edit("        if loop.time() >= self._next_takeover:", "        if False:"),),
        tests=(f"{OUTBOX}entries_of_a_killed_relay_are_published_by_another_within_10_s",),
    ),
    Mutant(
        "a dead relay's name removed while it still holds entries (stranded)",
        "session_close/lua/take_over_relays.lua",
        edits=(
            Edit(
                "    if #redis.call('XPENDING', stream, group, '-', '+', 1, name) == 0 then",
                "    if true then",
            ),
        ),
        tests=(
            f"{OUTBOX}a_dead_relays_name_leaves_the_group_only_once_all_its_entries_are_taken_over",
        ),
    ),
    Mutant(
        "outbox entry deleted before the broker's ack",
        RELAY,
        edits=(
            Edit(
                "        results = await asyncio.gather(*confirmations, return_exceptions=True)",
                "        results = [Basic.Ack()] * len(confirmations)",
            ),
        ),
        tests=(
            "tests/fault/test_api_faults.py::test_broker_cut_during_closes_loses_no_event[silent]",
        ),
    ),
    Mutant(
        "relay deletes an entry the broker returned unroutable",
        RELAY,
        edits=(
            Edit(
                "[e for e, r in zip(sent, results, strict=True) if isinstance(r, Basic.Ack)]",
                "[e for e in sent]",
            ),
        ),
        tests=(f"{OUTBOX}an_event_no_queue_takes_stays_in_the_outbox",),
    ),
    Mutant(
        "no publish timeout",
        RELAY,
        edits=(Edit("                timeout=timeout,\n", "                timeout=None,\n"),),
        tests=(f"{OUTBOX}publish_gives_up_on_a_silent_broker_within_the_publish_timeout",),
    ),
    # The workers: exactly-once effects, poison and malformed messages.
    Mutant(
        "audit insert without idempotency",
        "workers/audit.py",
        edits=(
            Edit("event_id    uuid PRIMARY KEY,", "event_id    uuid,"),
            Edit("        ON CONFLICT (event_id) DO NOTHING\n", ""),
        ),
        tests=(
            "tests/workers/test_audit.py::"
            "test_a_worker_killed_mid_batch_leaves_exactly_one_row_per_event_after_redelivery",
        ),
    ),
    Mutant(
        "push cleanup as a non-atomic read-then-delete",
        "workers/push_cleanup.py",
        edits=(
            Edit(
                "        replies = await REMOVE_PUSH_TOKENS("
                "self._redis, keys, [e.session_id for e in events])\n",
                "        replies = []\n"
                "        for key, event in zip(keys, events, strict=True):\n"
                "            mapped = await self._redis.hgetall(key)\n"
                "            stale = [t for t, s in mapped.items() if s == event.session_id]\n"
                "            replies.append(await self._redis.hdel(key, *stale) if stale else 0)\n",
            ),
        ),
        tests=(
            "tests/workers/test_push.py::"
            "test_tokens_reregistered_while_the_cleanup_runs_are_never_removed",
        ),
    ),
    Mutant(
        "push cleanup removes a token re-registered by a newer session",
        "session_close/lua/remove_push_tokens.lua",
        edits=(Edit("    if pairs[i + 1] == sid then\n", "    if true then\n"),),
        tests=(
            "tests/workers/test_push.py::"
            "test_a_token_reregistered_by_a_newer_session_survives_a_late_or_repeated_event",
        ),
    ),
    Mutant(
        "NUL check removed",
        "session_close/events.py",
        edits=(
            Edit('    if "\\x00" in value:\n', "    if False:\n"),
            Edit(
                '    return value is None or (isinstance(value, str) and "\\x00" not in value)',
                "    return value is None or isinstance(value, str)",
            ),
        ),
        tests=(f"{POISON}a_value_no_consumer_can_store_is_dead_lettered_at_first_delivery",),
    ),
    Mutant(
        "poison message retried forever",
        RUNNER,
        edits=(
            Edit(
                "        if not transient:\n            failed += 1\n",
                "        if False:\n            failed += 1\n",
            ),
        ),
        tests=(
            f"{POISON}a_push_key_of_the_wrong_type_is_dead_lettered_after_its_attempts_and_others_cleaned",
        ),
    ),
    Mutant(
        "a batch failing for one message's content is not split",
        "session_close/batching.py",
        edits=(
            Edit(
                "            return await asyncio.gather(*(alone(item) for item in items), "
                "return_exceptions=True)",
                "            raise",
            ),
        ),
        tests=(
            f"{POISON}a_row_the_database_rejects_is_dead_lettered_after_its_attempts_and_its_batch_lands",
        ),
    ),
    Mutant(
        "malformed message requeued instead of dead-lettered",
        RUNNER,
        edits=(
            Edit(
                '                self._dead_letter(held, "malformed", str(exc))\n',
                '                self._finish((held,), "requeue")\n',
            ),
        ),
        tests=(
            "tests/workers/test_dlq.py::"
            "test_malformed_messages_are_dead_lettered_at_once_and_replay_brings_good_ones_back",
        ),
    ),
    Mutant(
        "an ack reaches past a message held for retry",
        "workers/settler.py",
        edits=(
            Edit(
                "await ack(last.message, multiple=len(frame) > 1)",
                "await ack(last.message, multiple=True)",
            ),
        ),
        tests=(
            "tests/workers/test_settle.py::"
            "test_a_message_held_for_retry_is_never_acked_by_a_later_run_even_after_a_reconnect",
        ),
    ),
    Mutant(
        "worker batches in work uncapped",
        RUNNER,
        edits=(
            Edit(
                "size = min(self._batch_size - self._working, len(self._waiting))",
                "size = min(self._batch_size, len(self._waiting))",
            ),
        ),
        tests=(
            "tests/workers/test_batches.py::"
            "test_batches_share_deliveries_and_never_exceed_the_concurrency_retries_included",
        ),
    ),
    Mutant(
        "a batch the runner fails on stays held",
        RUNNER,
        edits=(
            Edit(
                '            self._finish(batch, "requeue")\n\n',
                "\n",
            ),
        ),
        tests=(
            "tests/workers/test_batches.py::"
            "test_a_batch_the_runner_fails_on_goes_back_to_the_queue_and_holds_nobody_back",
        ),
    ),
    # The API's edges.
    Mutant(
        "readiness gated on RabbitMQ",
        "service/ops.py",
        edits=(
            Edit(
                "Reply.READY if seen.redis_up else",
                "Reply.READY if seen.redis_up and seen.rabbitmq_up else",
            ),
        ),
        tests=(
            "tests/api/test_ops_endpoints.py::"
            "test_readyz_stays_ready_while_rabbitmq_is_unreachable_and_reports_it",
        ),
    ),
    Mutant(
        "a client stalled mid-request is never cut off",
        "service/server.py",
        edits=(Edit("if data and self._read_deadline is None:", "if False:"),),
        tests=(f"{HYGIENE}a_client_stalled_mid_headers_is_disconnected_after_the_read_timeout",),
    ),
    Mutant(
        "close batches in flight uncapped",
        "session_close/batching.py",
        edits=(
            Edit(
                "if self._max_in_flight is not None and len(self._tasks) >= self._max_in_flight:",
                "if False:",
            ),
        ),
        tests=(
            "tests/api/test_ops_endpoints.py::"
            "test_a_hanging_redis_gives_503s_from_a_bounded_number_of_connections",
        ),
    ),
    # The close script: all or nothing, idempotent, the owner's only.
    Mutant(
        "close script writing before its checks",
        CLOSE_SCRIPT,
        edits=(
            Edit(
                "  expect_type(user_sessions, 'set')\n",
                "  redis.call('DEL', session_key)\n  expect_type(user_sessions, 'set')\n",
            ),
        ),
        tests=(
            f"{IDEMPOTENCY}a_close_failing_on_a_key_of_the_wrong_type_writes_nothing_and_a_retry_closes",
        ),
    ),
    Mutant(
        "tombstone check removed",
        CLOSE_SCRIPT,
        edits=(Edit("  if tomb[1] then\n", "  if false then\n"),),
        tests=(
            f"{IDEMPOTENCY}a_retried_script_call_with_the_same_event_id_succeeds_without_a_second_event",
        ),
    ),
    Mutant(
        "ownership check removed",
        CLOSE_SCRIPT,
        edits=(Edit("  if session[1] ~= uid then\n    return 'missing'\n  end\n", ""),),
        tests=(f"{IDEMPOTENCY}a_session_owned_by_another_user_is_404_and_left_alone",),
    ),
    Mutant(
        "tombstone ownership check removed",
        CLOSE_SCRIPT,
        edits=(Edit("    if tomb[1] ~= uid then\n      return 'missing'\n    end\n", ""),),
        tests=(f"{IDEMPOTENCY}a_session_closed_by_another_user_is_404_not_case_8",),
    ),
    # Close-all.
    Mutant(
        "close-all closes sessions that are not the user's",
        CLOSE_ALL_SCRIPT,
        edits=(Edit("  if fields[1] ~= uid then\n", "  if fields[1] == false then\n"),),
        tests=(f"{CLOSE_ALL}other_users_stale_and_expired_sessions_are_not_closed",),
    ),
    Mutant(
        "close-all writing before its checks",
        CLOSE_ALL_SCRIPT,
        edits=(Edit("      expect_type(prefix .. 'session:closed:' .. sid, 'hash')\n", ""),),
        tests=(f"{CLOSE_ALL}a_key_of_the_wrong_type_fails_the_whole_step_and_writes_nothing",),
    ),
    Mutant(
        "close-all ignores keepCurrent",
        "service/handlers.py",
        edits=(Edit('headers["SessionID"] if keep_current else None', "None"),),
        tests=(f"{CLOSE_ALL}keep_current_keeps_the_requesting_session",),
    ),
    # Expiry: the index, the sweeper, and closes that respect expires_at.
    Mutant(
        "a close ignores expires_at",
        CLOSE_SCRIPT,
        edits=(Edit("  if expires_at and expires_at <= now then\n", "  if false then\n"),),
        tests=(
            "tests/outbox/test_expiry.py::"
            "test_a_close_of_a_session_past_its_expires_at_is_404_before_and_after_the_sweep",
        ),
    ),
    Mutant(
        "sliding expiry expired instead of re-scored",
        SWEEP_SCRIPT,
        edits=(Edit("  if expires_at > now then\n", "  if false then\n"),),
        tests=(f"{SWEEPER}a_sliding_expiry_is_rescored_not_expired",),
    ),
    Mutant(
        "sweeper batches unbounded",
        SWEEP_SCRIPT,
        edits=(Edit("'BYSCORE', 'LIMIT', 0, batch)", "'BYSCORE')"),),
        tests=(f"{SWEEPER}a_backlog_is_worked_off_in_batches_of_at_most_the_batch_size",),
    ),
    Mutant(
        "a session failing to sweep holds back the others",
        SWEEP_SCRIPT,
        edits=(Edit("    redis.call('ZADD', expiry, now + set_aside, sid)\n", ""),),
        tests=(f"{SWEEPER}a_session_failing_inside_redis_is_set_aside_and_writes_nothing",),
    ),
    # Issue 21: Sentinel and WAIT
    Mutant(
        "close replies before WAIT",
        "session_close/replication.py",
        edits=(
            Edit(
                "        _check(acked, settings)\n        return reply\n", "        return reply\n"
            ),
        ),
        tests=(
            "tests/fault/test_redis_failover.py::"
            "test_stalled_replicas_never_acknowledge_and_the_promoted_replica_holds_every_success",
        ),
    ),
    Mutant(
        "relay publishes before WAIT",
        "session_close/replication.py",
        edits=(Edit("\n    _check(acked, settings)\n", "\n"),),
        tests=(
            "tests/fault/test_redis_failover.py::"
            "test_stalled_replicas_never_acknowledge_and_the_promoted_replica_holds_every_success",
        ),
    ),
)


@dataclass(frozen=True)
class Run:
    passed: bool
    seconds: float
    timed_out: bool = False
    failing: str = ""  # the first failing test, from pytest's short summary
    broken: str = ""  # pytest could not run the tests at all (exit code 2 to 5)


def mutate(source: str, mutant: Mutant) -> str:
    """The source with the mutant's edits; ValueError names an edit that does not apply."""
    for edit in mutant.edits:
        count = source.count(edit.find)
        if count != 1:
            where = "not found" if count == 0 else f"found {count} times"
            raise ValueError(f"{edit.find.strip().splitlines()[0]!r} {where} in {mutant.file}")
        source = source.replace(edit.find, edit.replace)
    return source


def run_tests(copy: Path, tests: Sequence[str]) -> Run:
    """pytest on `tests` with the copy's code: cwd and PYTHONPATH are the copy, so it and
    the processes the tests start import the copy before the editable install."""
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(copy), os.environ.get("PYTHONPATH")])),
        # A restored file can keep the size and mtime second of its mutant: no stale .pyc.
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    command = [
        str(ROOT / ".venv" / "bin" / "python"),
        *("-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider"),
        *tests,
    ]
    started = time.monotonic()
    # A session of its own, so a timeout also ends the API and workers the tests started.
    with subprocess.Popen(
        command,
        cwd=copy,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            output, _ = proc.communicate(timeout=RUN_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return Run(passed=False, seconds=time.monotonic() - started, timed_out=True)
        except BaseException:  # Ctrl-C or SIGTERM reach this process, not the session
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    seconds = time.monotonic() - started
    if proc.returncode == 0:
        return Run(passed=True, seconds=seconds)
    if proc.returncode != 1:  # 2 to 5: collection error, interrupted, usage, nothing run
        tail = " | ".join(output.strip().splitlines()[-3:])
        return Run(passed=False, seconds=seconds, broken=f"pytest exit {proc.returncode}: {tail}")
    return Run(passed=False, seconds=seconds, failing=first_failure(output))


def first_failure(output: str) -> str:
    match = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.MULTILINE)
    return match.group(1) if match else "(see pytest output)"


def unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def matching(mutants: Sequence[Mutant], patterns: Sequence[str], option: str) -> set[Mutant]:
    chosen = set()
    for pattern in patterns:
        found = {m for m in mutants if pattern.lower() in m.name.lower()}
        if not found:
            raise SystemExit(f"{option} {pattern!r}: no mutant's name contains it (see --list)")
        chosen |= found
    return chosen


def check(mutants: Sequence[Mutant]) -> int:
    """Run the mutants in a fresh copy of the repository; the number killed."""
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(ROOT, copy, ignore=not_copied)
        mutated: dict[Mutant, str] = {}
        problems: dict[Mutant, str] = {}
        for mutant in mutants:
            try:
                mutated[mutant] = mutate((copy / mutant.file).read_text(), mutant)
            except (OSError, ValueError) as exc:
                problems[mutant] = str(exc)
            if not mutant.tests:
                problems[mutant] = "it names no tests to run"
        baseline = unique(t for m in mutated for t in m.tests)
        if baseline:
            print(f"baseline: {len(baseline)} tests on the unmutated copy", flush=True)
            run = run_tests(copy, baseline)
            if not run.passed:
                why = run.broken or ("timeout" if run.timed_out else f"{run.failing} failed")
                raise SystemExit(f"baseline must pass, and it did not: {why}")
            print(f"baseline passed ({run.seconds:.1f}s)", flush=True)
        killed = 0
        for mutant in mutants:
            if mutant in problems:
                print(f"NOT APPLIED {mutant.name}: {problems[mutant]}", flush=True)
                continue
            path = copy / mutant.file
            original = path.read_text()
            path.write_text(mutated[mutant])
            try:
                run = run_tests(copy, mutant.tests)
            finally:
                path.write_text(original)
            if run.broken:
                print(f"NOT APPLIED {mutant.name}: the mutated code does not run ({run.broken})")
            elif run.timed_out:
                killed += 1
                print(f"killed (timeout) {mutant.name}  ({run.seconds:.0f}s)")
            elif run.passed:
                print(f"SURVIVED {mutant.name}  ({run.seconds:.1f}s)")
            else:
                killed += 1
                print(f"killed   {mutant.name}  ({run.seconds:.1f}s, by {run.failing})")
            sys.stdout.flush()
        return killed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--list", action="store_true", help="print the mutants and their tests")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="TEXT",
        help="run only the mutants whose name contains TEXT (case-insensitive; repeatable)",
    )
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="TEXT",
        help="leave out the mutants whose name contains TEXT (repeatable)",
    )
    args = parser.parse_args(argv)
    only = matching(MUTANTS, args.only, "--only") if args.only else set(MUTANTS)
    skipped = matching(MUTANTS, args.skip, "--skip")
    mutants = [m for m in MUTANTS if m in only and m not in skipped]
    if args.list:
        for mutant in mutants:
            print(f"{mutant.name}  [{mutant.file}]")
            for test in mutant.tests:
                print(f"    {test}")
        return 0
    # As Ctrl-C does: unwind, so that the pytest run in hand is ended with its session.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started = time.monotonic()
    killed = check(mutants)
    print(f"mutants run in {time.monotonic() - started:.0f}s")
    for mutant in MUTANTS:
        if mutant in only and mutant in skipped:
            print(f"skipped  {mutant.name}")
    print(f"{killed} of {len(mutants)} mutants killed")
    return 0 if killed == len(mutants) else 1


if __name__ == "__main__":
    sys.exit(main())
