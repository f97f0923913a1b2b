"""No access token in any log line, on any path a request can take: `python -m service`
run as operators run it, at LOG_LEVEL=DEBUG, every line it writes (stdout and stderr)
read back after requests that end in 200, 400, 401 (malformed and unknown), 404, 413,
415, 500, 503 (Redis cut while a close runs) and the HTTP parser's own 400."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import signal
import uuid
from pathlib import Path

import aiohttp
from redis.asyncio import Redis

from session_close.keys import Keys, token_digest
from session_close.settings import Settings
from tests.conftest import through
from tests.support.closing import BODY, CLOSE_PATH, app_headers, open_session
from tests.support.processes import listening_port, log_tail, running, settings_env
from tests.support.proxy import TcpProxy
from tests.support.waiting import wait_until

USER, SID = "user-secret", "session-secret-0001"


def secret() -> str:
    return f"tok-{uuid.uuid4().hex}{uuid.uuid4().hex}"


def forms(token: str) -> list[str]:
    """What of a token must never be seen: itself, its first and last 16 characters
    (aiohttp's messages cut what they quote), its SHA-256 (the Redis key) and base64."""
    return [
        token,
        token[:16],
        token[-16:],
        token_digest(token),
        base64.b64encode(token.encode()).decode(),
    ]


async def test_no_token_in_any_log_line_on_any_path(
    settings: Settings,
    redis: Redis,
    keys: Keys,
    amqp_cleanup: None,
    redis_proxy: TcpProxy,
    tmp_path: Path,
) -> None:
    token, unknown, wrong_type = secret(), secret(), secret()
    await open_session(redis, keys, USER, SID, token)
    await redis.set(keys.token(wrong_type), USER)  # a key of the wrong type: the 500 path
    proxied = dataclasses.replace(settings, redis_url=through(settings.redis_url, redis_proxy))
    log = tmp_path / "api.log"
    env = settings_env(proxied, HTTP_HOST="127.0.0.1", HTTP_PORT="0", LOG_LEVEL="DEBUG")
    statuses: dict[str, int] = {}
    with running(["service"], env, log) as proc:
        port = listening_port(log, proc)
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession(base) as http:

            async def ready() -> bool:
                async with http.get("/readyz") as resp:
                    return resp.status == 200

            await wait_until(ready, "the API to be ready", within=30)

            async def post(name: str, headers: dict[str, str], data: bytes = BODY) -> None:
                async with http.post(CLOSE_PATH, headers=headers, data=data) as resp:
                    statuses[name] = resp.status

            await post("invalid", app_headers(token, SID, AppVersion="v1"))
            await post("malformed authorization", app_headers(token, SID, Authorization=token))
            await post("unknown token", app_headers(unknown, SID))
            await post("unknown session", app_headers(token, "session-nobody-has"))
            await post("too large", app_headers(token, SID), b"{" + b" " * 20_000 + b"}")
            await post("media type", app_headers(token, SID, **{"Content-Type": "text/plain"}))
            await post("internal", app_headers(wrong_type, SID))
            async with http.get("/nowhere", headers=app_headers(token, SID)) as resp:
                statuses["no route"] = resp.status

            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                f"POST {CLOSE_PATH} HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Basic {token[:20]}\x01{token[20:]}\r\n\r\n".encode()
            )
            statuses["parser"] = int((await asyncio.wait_for(reader.read(), 15)).split()[1])
            writer.close()

            redis_proxy.cut("reset")
            await post("redis cut", app_headers(token, SID))
            redis_proxy.restore()
            await post("closed", app_headers(token, SID))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0

    assert statuses == {
        "invalid": 400,
        "malformed authorization": 401,
        "unknown token": 401,
        "unknown session": 404,
        "too large": 413,
        "media type": 415,
        "internal": 500,
        "no route": 404,
        "parser": 400,
        "redis cut": 503,
        "closed": 200,
    }
    output = log.read_text(errors="replace")
    # The paths were logged: the check below reads the lines that matter.
    for logged in ("Redis unavailable", "unexpected error", "request rejected by the HTTP"):
        assert logged in output, log_tail(log)
    for secret_token in (token, unknown, wrong_type):
        leaked = [form for form in forms(secret_token) if form in output]
        assert leaked == [], [line for line in output.splitlines() if leaked[0] in line]
