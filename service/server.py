"""How the API listens: aiohttp's server, plus the two things its public knobs lack.

- A bound on reading a request. aiohttp's keepalive_timeout closes idle connections,
  but a client that sends half a header block, or one byte of a 100-byte body, is waited
  for as long as it likes. Here a request must arrive whole within
  HTTP_READ_TIMEOUT_SECONDS of its first byte (the middleware `request_read` says when
  the body is in), or the connection is closed.
- Requests aiohttp's parser rejects (a control character in a header, a header over the
  size limit) never reach the app: aiohttp logs them at ERROR with the raw header line
  and answers with it in a text/plain body, which puts access tokens in logs and
  replies. Here they get the JSON `info` reply (400, or 431 for a header too large) and
  a short log line that names the error's kind only.

Both live in a RequestHandler subclass, served by a site of our own: aiohttp offers no
setting for either, and run_app cannot take a site, so `serve` replaces it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong

from service.accesslog import ACCESS_LOGGER, JsonAccessLogger
from service.replies import Reply, info_reply
from session_close.settings import Settings

log = logging.getLogger(__name__)


class GuardedRequestHandler(web.RequestHandler):
    def __init__(self, manager: web.Server, *, read_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._read_timeout = read_timeout
        self._read_deadline: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        if data and self._read_deadline is None:
            # the first byte of a request: from now on it has read_timeout to arrive
            self._read_deadline = asyncio.get_running_loop().call_later(
                self._read_timeout, self._stalled
            )
        super().data_received(data)

    def request_read(self) -> None:
        """The app has the whole request (headers and body): stop the clock."""
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def connection_lost(self, exc: BaseException | None) -> None:
        self.request_read()
        super().connection_lost(exc)

    def _stalled(self) -> None:
        self._read_deadline = None
        log.info(
            "client stalled sending its request; disconnected",
            extra={"read_timeout": self._read_timeout},
        )
        self.force_close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # The exception's text quotes the offending input (a token, say): log its kind only.
        reply = Reply.HEADERS_TOO_LARGE if isinstance(exc, LineTooLong) else Reply.BAD_REQUEST
        if status >= 500:
            reply = Reply.INTERNAL
        log.info(
            "request rejected by the HTTP parser",
            extra={"status": reply.status, "error": type(exc).__name__ if exc else None},
        )
        if request.writer.output_size > 0:
            raise ConnectionError("a reply was already sent; the connection is broken")
        response = info_reply(request, reply, headers={"X-Request-ID": uuid.uuid4().hex})
        response.force_close()
        return response


class GuardedSite(web.BaseSite):
    """A TCP site whose connections are GuardedRequestHandlers."""

    def __init__(
        self, runner: web.AppRunner, host: str, port: int, options: dict[str, Any]
    ) -> None:
        super().__init__(runner)
        self._host, self._port = host, port
        self._options = options
        self._listener: asyncio.Server | None = None

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self.port}"

    @property
    def port(self) -> int:
        """The port bound (the one the OS chose when asked for port 0)."""
        assert self._listener is not None
        port: int = self._listener.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        self._server = self._listener = await loop.create_server(
            lambda: GuardedRequestHandler(server, loop=loop, **self._options),
            self._host,
            self._port,
            backlog=self._backlog,
        )


def handler_options(settings: Settings) -> dict[str, Any]:
    return {
        "read_timeout": settings.http_read_timeout_seconds,
        "keepalive_timeout": settings.http_keepalive_timeout_seconds,
        "access_log_class": JsonAccessLogger,
        "access_log": ACCESS_LOGGER,
    }


@asynccontextmanager
async def listening(app: web.Application, settings: Settings) -> AsyncIterator[int]:
    """Start the app (its cleanup contexts included) on HTTP_HOST:HTTP_PORT and yield
    the port bound; on the way out, stop listening, let the requests in flight finish
    (SHUTDOWN_TIMEOUT_SECONDS) and clean up."""
    runner = web.AppRunner(app, shutdown_timeout=settings.shutdown_timeout_seconds)
    await runner.setup()
    try:
        site = GuardedSite(
            runner, settings.http_host, settings.http_port, handler_options(settings)
        )
        await site.start()
        log.info("listening", extra={"host": settings.http_host, "port": site.port})
        yield site.port
    finally:
        await runner.cleanup()


async def serve(app: web.Application, settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with listening(app, settings):
        await stop.wait()
