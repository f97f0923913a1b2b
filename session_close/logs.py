"""Structured JSON logs: stdlib module loggers rendered as one JSON object per line by
structlog, with the context (request id, event id) bound through contextvars."""

from __future__ import annotations

import logging
import sys

import orjson
import structlog
from structlog.typing import Processor

_shared: list[Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.stdlib.ExtraAdder(),
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


# What a LogRecord holds of its own; the rest of its __dict__ is `extra` (as ExtraAdder).
_RECORD_KEYS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__)
_stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)


class JsonLines(structlog.stdlib.ProcessorFormatter):
    """The JSON renderer of the processor chain, with a direct path for the plain
    record (a constant message and extra fields; no exception, stack or %-arguments):
    the same fields in the same order, serialised by orjson. The workers log a line
    per event, and through the chain a line cost more CPU than the event's effect."""

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info or record.args:
            return super().format(record)
        message = record.msg
        if not isinstance(message, str):  # structlog's own records carry a dict
            return super().format(record)
        event: dict[str, object] = {"event": message}
        structlog.contextvars.merge_contextvars(None, "", event)
        event["level"] = record.levelname.lower()
        event["logger"] = record.name
        for key, value in record.__dict__.items():
            if key not in _RECORD_KEYS:
                event[key] = value
        _stamp(None, "", event)
        try:
            return orjson.dumps(event, default=repr, option=orjson.OPT_NON_STR_KEYS).decode()
        except orjson.JSONEncodeError:  # say, an int beyond 64 bits: the chain copes
            return super().format(record)


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
    handler = logging.StreamHandler(sys.stderr if for_humans else sys.stdout)
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


def short_id(value: str) -> str:
    """Session ids are shortened in logs: enough to correlate, not enough to reuse."""
    return value[:8] + "…" if len(value) > 8 else value
