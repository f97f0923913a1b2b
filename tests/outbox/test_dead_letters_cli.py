"""`sessionctl outbox dead-letters` lists what the relay set aside, and `sessionctl
outbox replay` moves it back to the outbox, corrected or not, for the relay to publish
(docs/operations.md)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aio_pika
import pytest
from redis.asyncio import Redis

from outbox.relay import Relay
from outbox.stream import ensure_group
from session_close.keys import Keys
from session_close.settings import Settings
from session_close.topology import Topology
from tests.contract.test_cli import run_json, sessionctl
from tests.support.delivered import closed_entry, outbox_length, take_messages, write_entries
from tests.support.waiting import wait_until


@pytest.fixture
async def relay(
    settings: Settings, redis: Redis, keys: Keys, amqp_cleanup: None
) -> AsyncIterator[None]:
    await ensure_group(redis, keys)
    connection = await aio_pika.connect_robust(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await Topology.from_settings(settings).declare(channel)
        running = Relay(redis, settings)
        task = asyncio.create_task(running.run(exchange))
        yield
        await running.stop(task)


async def dead_letters_are(redis: Redis, keys: Keys, count: int) -> None:
    async def set_aside() -> bool:
        return (
            await outbox_length(redis, keys) == 0 and await redis.xlen(keys.dead_letters) == count
        )

    await wait_until(set_aside, f"{count} dead letters and an empty outbox", within=15)


async def test_dead_letters_are_listed_and_replayed_with_a_correction_or_as_they_are(
    settings: Settings, redis: Redis, keys: Keys, relay: None
) -> None:
    expired = closed_entry(
        1, type="session.expired", reason="expired", expired_at="nan", request_id=""
    )
    incomplete = closed_entry(2)
    del incomplete["session_id"]
    await write_entries(redis, keys, [expired, incomplete])
    await dead_letters_are(redis, keys, 2)

    listed = (await run_json(settings, "outbox", "dead-letters"))["deadLetters"]
    assert [(d["fields"]["event_id"], d["fields"]["dead_letter_field"]) for d in listed] == [
        (expired["event_id"], "expired_at"),
        (incomplete["event_id"], "session_id"),
    ]
    assert listed[0]["fields"]["expired_at"] == "nan"

    # The operator found the session's real expires_at and replays that one entry.
    replayed = await run_json(
        settings, "outbox", "replay", "--id", listed[0]["id"], "--set", "expired_at=1767225600"
    )
    assert [r["id"] for r in replayed["replayed"]] == [listed[0]["id"]]
    assert replayed["missing"] == []
    await dead_letters_are(redis, keys, 1)
    queue = Topology.from_settings(settings).queue("audit")
    (message,) = await take_messages(settings.amqp_url, queue)
    assert message["messageId"] == expired["event_id"]
    assert message["data"]["expiredAt"] == "2026-01-01T00:00:00.000Z"  # type: ignore[index]

    # Replayed as it is, the incomplete entry is set aside again, under its new id.
    replayed = await run_json(settings, "outbox", "replay")
    (moved,) = replayed["replayed"]
    assert moved["id"] == listed[1]["id"]
    await dead_letters_are(redis, keys, 1)
    (again,) = (await run_json(settings, "outbox", "dead-letters"))["deadLetters"]
    assert again["fields"]["event_id"] == incomplete["event_id"]
    assert again["fields"]["dead_letter_entry_id"] == moved["outboxId"]


async def test_a_replay_of_an_unknown_id_replays_nothing_and_says_so(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    replayed = await run_json(settings, "outbox", "replay", "--id", "1-1")
    assert replayed == {"replayed": [], "missing": ["1-1"]}
    assert await outbox_length(redis, keys) == 0


async def test_a_correction_needs_the_id_of_the_entry_it_corrects(settings: Settings) -> None:
    code, _, err = await sessionctl(settings, "outbox", "replay", "--set", "expired_at=1")
    assert code == 2
    assert "--set needs --id" in err
