"""connect_redis's connections encode commands with hiredis (redis-py's asyncio client
would in Python): the bytes must be exactly those of redis-py's own encoder, for every
kind of argument the service sends, on a single node and behind Sentinel."""

from __future__ import annotations

import dataclasses

import pytest
from redis.asyncio.connection import Connection
from redis.typing import EncodableT

from session_close.keys import Keys
from session_close.redis_client import connect_redis
from session_close.settings import Settings

KEYS = Keys("test:prefix:")
COMMANDS: list[tuple[EncodableT, ...]] = [
    # A close: the script's keys and arguments (text that is not ASCII, an empty os).
    (
        "EVALSHA",
        "a" * 40,
        5,
        KEYS.outbox(7),
        KEYS.expiry(7),
        KEYS.session("ü-user", "s1"),
        KEYS.tombstone("ü-user", "s1"),
        KEYS.user_sessions("ü-user"),
        86400,
        "2026-12-07T18:00:00.000Z",
        "ü-user",
        "s1",
        "",
        "1.2.3 (βeta)",
    ),
    (
        "XREADGROUP",
        "GROUP",
        "relay",
        "host-1",
        "COUNT",
        100,
        "BLOCK",
        500,
        "STREAMS",
        *KEYS.outboxes,
        *[">"] * 256,
    ),
    ("SET", b"\xff\x00 bytes", 1.5, "PX", 2**40),
    ("CONFIG GET", "appendonly"),  # a command name of two words
]


@pytest.mark.parametrize("sentinels", ["", "127.0.0.1:26379"], ids=["single node", "sentinel"])
async def test_commands_are_encoded_to_the_same_bytes_as_redis_pys_encoder(sentinels: str) -> None:
    client = connect_redis(dataclasses.replace(Settings(), redis_sentinels=sentinels))
    try:
        pool = client.connection_pool
        ours = pool.connection_class(**pool.connection_kwargs)
        theirs = Connection()
        for command in COMMANDS:
            assert b"".join(ours.pack_command(*command)) == b"".join(theirs.pack_command(*command))
    finally:
        await client.aclose()
