"""A small TCP proxy for fault tests: put it between the code under test and Redis,
RabbitMQ or PostgreSQL, then cut() and restore() the link without touching the
machine's shared services. It runs its own event loop in a thread, so sync tests,
async tests and subprocesses started by a test can all go through it."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Literal

Mode = Literal["reset", "blackhole", "silent"]


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._mode: Mode | None = None
        # Connections the proxy was asked for, refused ones included: how a test sees
        # that the code under test tried (and retried) to reach its peer.
        self.accepted = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    def start(self) -> TcpProxy:
        self._thread.start()
        self._call(self._listen())
        return self

    def close(self) -> None:
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def cut(self, mode: Mode = "reset") -> None:
        """reset: drop every connection and refuse new ones at once (a dead peer);
        blackhole: drop every connection, then keep accepting but never forward a byte
        (a peer that hangs once reconnected to);
        silent: keep every connection open but forward nothing more, and hold new ones
        the same way (a peer that hangs mid-conversation: only a timeout notices)."""
        self._call(self._cut(mode))

    def restore(self) -> None:
        self._call(self._restore())

    @property
    def open_connections(self) -> int:
        """Connections the proxy holds now, both sides counted: how a test sees that the
        code under test reached a blackholed peer."""
        return len(self._writers)

    def _call(self, coro: object) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)  # type: ignore[arg-type]

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        await self._drop_all()
        if self._server is not None:
            self._server.close()

    async def _cut(self, mode: Mode) -> None:
        self._mode = mode
        if mode != "silent":
            await self._drop_all()

    async def _restore(self) -> None:
        self._mode = None
        # Held connections lost bytes (or never worked): close them too.
        await self._drop_all()

    async def _drop_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self._mode == "reset":
            writer.transport.abort()
            return
        self._writers.add(writer)
        if self._mode in ("blackhole", "silent"):
            return  # held open, silent, until restore() or close()
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.add(up_writer)
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if self._mode == "silent":
                    continue  # swallowed: the connection stays open, nothing arrives
                if self._mode is not None:
                    break
                writer.write(data)
                await writer.drain()
        finally:
            with contextlib.suppress(Exception):
                writer.transport.abort()
            self._writers.discard(writer)
