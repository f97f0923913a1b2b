"""One JSON access line per request, replacing aiohttp's Apache-style line. The path is
logged without its query string, and no header is logged at all, so tokens and session
ids never reach the access log.

The line has the fields session_close.logs gives every line, but is written straight to stdout:
through logging and structlog's processor chain it cost about 20 us, against 3 us here,
and it is written once per request."""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from time import perf_counter

import orjson
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

from service.appkeys import REQUEST_ID, REQUEST_STARTED, TRACE_IDS
from session_close import tracing

ACCESS_LOGGER = logging.getLogger("service.access")


class JsonAccessLogger(AbstractAccessLogger):
    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        started = request.get(REQUEST_STARTED)
        if started is not None:
            time = perf_counter() - started
        line = {
            "event": "request",
            "level": "info",
            "logger": self.logger.name,
            # Absent only when aiohttp answered before the app ran (a malformed request).
            "request_id": request.get(REQUEST_ID) or response.headers.get("X-Request-ID"),
            "method": request.method,
            "path": request.path,
            "status": response.status,
            "latency_ms": round(time * 1000, 3),
            "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        }
        if tracing.ENABLED:  # the server span's of a close, gone by now
            line |= request.get(TRACE_IDS, {})
        sys.stdout.write(orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE).decode())
        sys.stdout.flush()

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
