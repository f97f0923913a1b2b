"""`python -m service` as operators run it: JSON access lines on stdout, and a SIGTERM
that lets the request in flight finish before the process exits 0."""

from __future__ import annotations

import json
import signal
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from redis.asyncio import Redis

from outbox.stream import backlog
from session_close.cli import create_session, create_token
from session_close.keys import Keys
from session_close.settings import Settings
from tests.conftest import through
from tests.support.processes import listening_port, running, settings_env
from tests.support.proxy import TcpProxy
from tests.support.waiting import wait_until

TOKEN = "tok-secret-4f9a2c"
SESSION_ID = "sess-ops-0123456789abcdef"


def api_env(settings: Settings) -> dict[str, str]:
    # port 0: the API binds a free port itself and logs it (no race for a port)
    return settings_env(settings, HTTP_HOST="127.0.0.1", HTTP_PORT="0", LOG_LEVEL="INFO")


def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


async def wait_ready(port: int) -> None:
    await wait_until(lambda: get(port, "/readyz")[0] == 200, "the API to be ready")


def json_lines(log: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


async def test_access_log_is_one_json_line_per_request_without_secrets(
    settings: Settings, redis: Redis, amqp_cleanup: None, tmp_path: Path
) -> None:
    log = tmp_path / "api.log"
    with running(["service"], api_env(settings), log) as proc:
        port = listening_port(log, proc)
        await wait_ready(port)
        assert get(port, "/healthz", {"X-Request-ID": "ops-req-1"})[0] == 200
        status, _ = get(port, "/no/such/path?token=abc", {"X-Request-ID": "ops-req-2"})
        assert status == 404
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1.0/session/close",
            data=b'{"requestContent": {}}',
            headers={
                "Content-Type": "application/json",
                "Authorization": f"Basic {TOKEN}",
                "SessionID": SESSION_ID,
                "X-Request-ID": "ops-req-3",
            },
            method="POST",
        )
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(request, timeout=5)  # noqa: ASYNC210 - the server is another process
        raised.value.close()
        assert raised.value.code == 401  # unknown token
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0

    lines = json_lines(log)  # every line of the output is JSON
    access = {line["request_id"]: line for line in lines if line.get("logger") == "service.access"}
    assert access["ops-req-1"]["method"] == "GET"
    assert access["ops-req-1"]["path"] == "/healthz"
    assert access["ops-req-1"]["status"] == 200
    assert access["ops-req-2"]["path"] == "/no/such/path"  # no query string
    assert access["ops-req-2"]["status"] == 404
    assert access["ops-req-3"]["status"] == 401
    assert access["ops-req-3"]["method"] == "POST"
    for line in access.values():
        latency = line["latency_ms"]
        assert isinstance(latency, float)
        assert 0 < latency < 5000
        assert {"timestamp", "level"} <= line.keys()
    text = log.read_text()
    assert TOKEN not in text
    assert SESSION_ID not in text


def read_until(sock: socket.socket, marker: bytes, deadline: float = 10.0) -> bytes:
    data = b""
    sock.settimeout(deadline)
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def refuses_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return False
    except OSError:
        return True


async def test_sigterm_finishes_the_request_in_flight_and_exits_0(
    settings: Settings,
    redis: Redis,
    keys: Keys,
    amqp_cleanup: None,
    redis_proxy: TcpProxy,
    tmp_path: Path,
) -> None:
    await create_token(redis, keys, "u-shutdown", TOKEN, 60)
    await create_session(redis, keys, "u-shutdown", SESSION_ID, ttl=60)
    log = tmp_path / "api.log"
    env = api_env(settings) | {
        "REDIS_URL": through(settings.redis_url, redis_proxy),
        "REDIS_TIMEOUT_SECONDS": "10",
        "SHUTDOWN_TIMEOUT_SECONDS": "20",
        # Without the relay, the close is the only thing that talks to Redis, so the
        # proxy shows when it is in flight.
        "RELAY_ENABLED": "false",
    }
    body = b'{"requestContent": {}}'
    with running(["service"], env, log) as proc:
        port = listening_port(log, proc)
        await wait_ready(port)
        # First drop the app's idle Redis connection (readyz sees it fail and lets it go),
        # so the close below starts on a new one and keeps its one retry for restore().
        redis_proxy.cut("reset")
        assert get(port, "/readyz")[0] == 503
        # A Redis that hangs keeps the close in flight, in the handler, until restore().
        redis_proxy.cut("blackhole")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(
                b"POST /v1.0/session/close HTTP/1.1\r\n"
                b"Host: 127.0.0.1\r\n"
                b"Content-Type: application/json; multipart/form-data;\r\n"
                + f"Authorization: Basic {TOKEN}\r\nSessionid: {SESSION_ID}\r\n".encode()
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await wait_until(
                lambda: redis_proxy.open_connections > 0, "the close to reach Redis", within=10
            )

            proc.send_signal(signal.SIGTERM)
            await wait_until(
                lambda: refuses_connections(port),
                "no new connections accepted after SIGTERM",
                within=10,
            )
            assert proc.poll() is None  # the request in flight keeps it running

            redis_proxy.restore()  # the held connection drops; the client reconnects
            reply = read_until(sock, b'"}}')
        head, _, payload = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), reply
        assert json.loads(payload)["info"]["type"] == "success"
        assert proc.wait(15) == 0

    assert await backlog(redis, keys) == 1  # its event waits for the next relay
    assert any(
        line.get("logger") == "service.access" and line.get("status") == 200
        for line in json_lines(log)
    )
