"""Structured JSON logs: stdlib module loggers rendered as one JSON object per line by
structlog, with the context (request id, event id) bound through contextvars."""

from __future__ import annotations

import asyncio
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from session_close import tracing


def add_trace_ids(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """trace_id and span_id of the span the line is written in, when tracing is on."""
    event.update(tracing.current_ids())
    return event


_shared: list[Processor] = [
    structlog.contextvars.merge_contextvars,
    add_trace_ids,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.stdlib.ExtraAdder(),
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


# What a LogRecord holds of its own; the rest of its __dict__ is `extra` (as ExtraAdder).
_RECORD_KEYS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__)


class _Clock:
    """A record's time in RFC 3339, UTC, to the microsecond (TimeStamper's form), with the
    date and time of day formatted once a second."""

    __slots__ = ("_second",)

    def __init__(self) -> None:
        self._second = (0, "")  # one tuple, replaced whole: safe across threads

    def __call__(self, created: float) -> str:
        second, prefix = self._second
        if int(created) != second:
            second = int(created)
            prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._second = (second, prefix)
        return f"{prefix}.{int((created - second) * 1_000_000):06d}Z"


class JsonLines(structlog.stdlib.ProcessorFormatter):
    """The JSON renderer of the processor chain, with a direct path for the plain
    record (a constant message and extra fields; no exception, stack or %-arguments):
    the same fields in the same order, serialised by orjson. The workers log a line
    per event, and through the chain a line cost more CPU than the event's effect."""

    _clock = _Clock()

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info or record.args:
            return super().format(record)
        message = record.msg
        if not isinstance(message, str):  # structlog's own records carry a dict
            return super().format(record)
        event: dict[str, object] = {"event": message}
        structlog.contextvars.merge_contextvars(None, "", event)
        if tracing.ENABLED:
            event.update(tracing.current_ids())
        event["level"] = record.levelname.lower()
        event["logger"] = record.name
        for key, value in record.__dict__.items():
            if key not in _RECORD_KEYS:
                event[key] = value
        timestamp = self._clock(record.created)
        each = event.pop(EACH, None)
        try:
            if isinstance(each, list):  # log_each: a line per item
                return "\n".join(
                    orjson.dumps(
                        {**event, **item, "timestamp": timestamp},
                        default=repr,
                        option=orjson.OPT_NON_STR_KEYS,
                    ).decode()
                    for item in each
                )
            event["timestamp"] = timestamp
            return orjson.dumps(event, default=repr, option=orjson.OPT_NON_STR_KEYS).decode()
        except orjson.JSONEncodeError:  # say, an int beyond 64 bits: the chain copes
            return super().format(record)


class LineWriter(logging.StreamHandler):  # type: ignore[type-arg]
    """Lines written as they come, flushed once per event-loop iteration while a loop
    runs in this thread (a worker logs a line per event: a write per line was a tenth of
    a line's cost), at once otherwise, and at once from WARNING up."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        # The loop a flush is due in; another loop (the last one closed before it ran
        # the flush) schedules its own.
        self._flush_due: asyncio.AbstractEventLoop | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + self.terminator)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING:
            self.flush()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if self._flush_due is not loop:
            self._flush_due = loop
            loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_due = None
        self.flush()


def configure_logging(level: str, *, for_humans: bool = False) -> None:
    """JSON lines on stdout; for_humans (the bench, at a terminal): the same fields as
    key=value text on stderr."""
    rendering: list[Processor] = (
        [structlog.dev.ConsoleRenderer(colors=False)]
        if for_humans
        else [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    )
    formatter_type = structlog.stdlib.ProcessorFormatter if for_humans else JsonLines
    formatter = formatter_type(
        foreign_pre_chain=_shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *rendering],
    )
    handler = LineWriter(sys.stderr if for_humans else sys.stdout)
    handler.setFormatter(formatter)
    # No line shows the caller's frame, thread or process, so skip gathering them
    # ("Optimization" in the logging HOWTO): a worker logs a line per event.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aio-pika and aiormq narrate every reconnect attempt at INFO
    for noisy in ("aio_pika", "aiormq"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


# The extra field of a record that log_each makes: the fields of each of its lines.
EACH = "each"


def log_each(logger: logging.Logger, level: int, message: str, each: list[dict[str, Any]]) -> None:
    """A line per item of `each`, each with `message` and the item's fields, through one
    log record: the workers log a line per event, and the logging machinery (a record,
    the handler chain, its lock) cost more per line than the line itself. JsonLines
    writes the lines; another formatter (pytest's, the bench's) sees one record whose
    `each` field lists them."""
    if each and logger.isEnabledFor(level):
        logger.log(level, message, extra={EACH: each})


def short_id(value: str) -> str:
    """Session ids are shortened in logs: enough to correlate, not enough to reuse."""
    return value[:8] + "…" if len(value) > 8 else value
