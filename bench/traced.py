"""The close run with tracing on: the API exports its spans by OTLP/HTTP to a receiver of
the run's own, which answers every export at once and counts what arrived (the cost
measured is the API's: building, batching and sending spans, not a collector's). The
receiver runs on a thread of its own, so it answers while the bench waits for a process
to stop (the API flushes its last spans at exit)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from bench.stack import Stack, wait_for_port
from bench.wrk import WrkResult


class Receiver(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Export)
        self.exports = 0
        self.bytes = 0
        self._lock = threading.Lock()

    def count(self, size: int) -> None:
        with self._lock:
            self.exports += 1
            self.bytes += size


class _Export(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        size = int(self.headers.get("Content-Length", 0))
        self.rfile.read(size)
        self.server.count(size)
        # An empty ExportTraceServiceResponse: every span accepted.
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


async def measure(
    stack: Stack, seconds: float, connections: int, first: int
) -> tuple[WrkResult, int, Receiver]:
    """The close run (relay in the API) with OTEL_EXPORTER_OTLP_ENDPOINT set. Returns the
    result, the next unused session index and the receiver (what it got)."""
    from bench.load import measure_close

    receiver = Receiver()
    thread = threading.Thread(target=receiver.serve_forever, name="otlp-receiver", daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{receiver.server_address[1]}"
        api = stack.start(
            "api-traced", ["-m", "service"], stack.env({"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint})
        )
        await wait_for_port(api, stack.settings.http_port)
        result, first, _ = await measure_close(stack, api, seconds, connections, None, first)
        stack.stop(api)
        return result, first, receiver
    finally:
        receiver.shutdown()
        receiver.server_close()
