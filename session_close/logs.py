"""Structured JSON logs: stdlib module loggers rendered as one JSON object per line by
structlog, with the context (request id, event id) bound through contextvars."""

from __future__ import annotations

import logging
import sys

import structlog
from structlog.typing import Processor

_shared: list[Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.stdlib.ExtraAdder(),
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def configure_logging(level: str, *, for_humans: bool = False) -> None:
    """JSON lines on stdout; for_humans (the bench, at a terminal): the same fields as
    key=value text on stderr."""
    rendering: list[Processor] = (
        [structlog.dev.ConsoleRenderer(colors=False)]
        if for_humans
        else [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *rendering],
    )
    handler = logging.StreamHandler(sys.stderr if for_humans else sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aio-pika and aiormq narrate every reconnect attempt at INFO
    for noisy in ("aio_pika", "aiormq"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def short_id(value: str) -> str:
    """Session ids are shortened in logs: enough to correlate, not enough to reuse."""
    return value[:8] + "…" if len(value) > 8 else value
