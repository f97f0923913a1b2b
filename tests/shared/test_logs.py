"""Logs carry their values as fields, not formatted into the message: the message is a
constant that operators can search for, and event id, attempt or delay are queryable
fields (`log.warning("failed; retrying", extra={"attempt": n, "delay": d})`)."""

from __future__ import annotations

import ast
import io
import json
import logging
import sys

import pytest

from session_close.logs import EACH, configure_logging, log_each
from tests.support.paths import ROOT

PACKAGES = ("session_close", "service", "outbox", "workers", "bench")
LEVELS = frozenset({"debug", "info", "warning", "error", "exception", "critical", "log"})
LOGGERS = frozenset({"log", "logger", "logging"})


def interpolated(message: ast.expr) -> bool:
    """An f-string, a %-formatted or .format()ted string, or one with %-placeholders."""
    if isinstance(message, ast.JoinedStr):
        return True
    if isinstance(message, ast.BinOp) and isinstance(message.op, ast.Mod | ast.Add):
        return True
    if isinstance(message, ast.Call) and isinstance(message.func, ast.Attribute):
        return message.func.attr == "format"
    if isinstance(message, ast.Constant) and isinstance(message.value, str):
        return any(f"%{c}" in message.value for c in "sdrfiox(.0123456789")
    return False


def interpolating_log_calls(source: str) -> list[int]:
    """Line numbers of the log calls whose message is not a constant (or that pass
    arguments to format into it)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        receiver = node.func.value
        name = receiver.id if isinstance(receiver, ast.Name) else None
        if name not in LOGGERS or node.func.attr not in LEVELS or not node.args:
            continue
        # log.log(level, message, ...): the message comes second
        args = node.args[1:] if node.func.attr == "log" else node.args
        if args and (interpolated(args[0]) or len(args) > 1):
            lines.append(node.lineno)
    return lines


def test_the_checker_finds_interpolated_messages() -> None:
    bad = """
log.info("worker %s stopped", name)
log.warning(f"retrying in {delay}s")
logging.info("done in " + str(seconds))
log.error("{} failed".format(what))
log.log(logging.INFO, "moved %d", n)
"""
    good = """
log.info("worker stopped", extra={"worker": name})
log.exception("outbox relay failed; retrying")
redis.info("persistence")
"""
    assert interpolating_log_calls(bad) == [2, 3, 4, 5, 6]
    assert interpolating_log_calls(good) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_log_messages_are_constant_and_values_are_fields(package: str) -> None:
    found = {
        f"{path.relative_to(ROOT)}:{line}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for line in interpolating_log_calls(path.read_text())
    }
    assert found == set(), "log values as extra={...} fields, not in the message"


def test_log_each_writes_a_json_line_per_item_with_the_records_fields(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stdout", stream)
    logger = logging.getLogger("tests.each")
    try:
        configure_logging("INFO")
        log_each(logger, logging.INFO, "thing done", [{"n": 1, "id": "a"}, {"n": 2}])
        log_each(logger, logging.INFO, "nothing done", [])
        log_each(logger, logging.DEBUG, "below the level", [{"n": 3}])
        root.handlers[0].flush()
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(line["event"], line["level"], line["logger"]) for line in lines] == [
        ("thing done", "info", "tests.each"),
        ("thing done", "info", "tests.each"),
    ]
    assert [(line["n"], line.get("id")) for line in lines] == [(1, "a"), (2, None)]
    assert lines[0]["timestamp"] == lines[1]["timestamp"]
    assert all(EACH not in line for line in lines)
