"""HTTP_READ_TIMEOUT_SECONDS is the time a client has to send its request, not a rough
order of magnitude: a client stalled mid-headers or mid-body is cut off close to it."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from session_close.settings import Settings
from tests.api.test_http_hygiene import CLOSE_HEAD, READ_TIMEOUT, seconds_until_closed, served
from tests.support.closing import TOKEN

# The clock starts at the request's first byte, a moment before ours: the cut may come a
# little early. The upper bound leaves 2 s for a loaded 2-core machine's event loop, far
# below what a timeout several times too long would take.
EARLIEST, LATEST = 0.9 * READ_TIMEOUT, READ_TIMEOUT + 2.0

STALLED = {
    "mid-headers": CLOSE_HEAD + f"Authorization: Basic {TOKEN}",
    "mid-body": CLOSE_HEAD + f"Authorization: Basic {TOKEN}\r\nContent-Length: 100\r\n\r\n{{",
}


@pytest.mark.parametrize("where", STALLED)
async def test_a_stalled_client_is_cut_off_close_to_the_read_timeout(
    settings: Settings, redis: Redis, amqp_cleanup: None, where: str
) -> None:
    # keep-alive far longer than the bound: only the read timeout can close it
    async with served(settings, http_keepalive_timeout_seconds=120.0) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(STALLED[where].encode())
        elapsed, received = await seconds_until_closed(reader)
        writer.close()
    assert received == b""
    assert EARLIEST <= elapsed <= LATEST, f"cut off after {elapsed:.2f}s"
