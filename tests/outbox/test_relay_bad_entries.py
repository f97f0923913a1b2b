"""An outbox entry that cannot become a valid event is set aside, never in the way
(docs/operations.md, issue 19): it goes to the dead-letter stream with the field at
fault and the reason, the rest of its batch is published once, and /metrics answers."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

import pytest
from aiohttp.pytest_plugin import AiohttpClient
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from outbox.stream import ensure_group, oldest_entry_age
from service.app import create_app
from service.appkeys import AMQP
from session_close.events import BadEntry, SessionEvent
from session_close.keys import Keys
from session_close.redis_client import connect_redis
from session_close.settings import Settings
from session_close.topology import Topology
from tests.support.closing import BODY, CLOSE_PATH, Client, app_headers, open_session
from tests.support.delivered import (
    closed_entry,
    entry_bucket,
    outbox_length,
    stream_entries,
    take_messages,
    write_entries,
)
from tests.support.waiting import wait_until

pytestmark = pytest.mark.fault

USER, TOKEN = "user-1", "token-of-user-1"
CLOSES = 600
RATE = 300  # closes per second
NOT_UNIX_TIMES = ("nan", "0x10", "-1e20", "-62135596801")
NOT_UTF8 = b"Andr\xffoid\xfe"


def expired_entry(n: int, expired_at: str) -> dict[str, str | bytes]:
    """What sweep_expired.lua writes for a session whose expires_at is `expired_at`."""
    return closed_entry(
        n, type="session.expired", reason="expired", expired_at=expired_at, request_id=""
    )


def bad_entries() -> list[tuple[dict[str, str | bytes], str]]:
    """Each entry no event can be made of, with the field a dead letter must name."""
    bad: list[tuple[dict[str, str | bytes], str]] = [
        (expired_entry(n, value), "expired_at") for n, value in enumerate(NOT_UNIX_TIMES)
    ]
    incomplete = closed_entry(len(bad))
    del incomplete["user_id"]
    return [*bad, (incomplete, "user_id")]


@pytest.mark.parametrize("value", NOT_UNIX_TIMES)
def test_an_expired_at_that_is_no_unix_time_of_years_1_to_9999_makes_a_bad_entry(
    value: str,
) -> None:
    with pytest.raises(BadEntry) as raised:
        SessionEvent.from_outbox(expired_entry(0, value))  # type: ignore[arg-type]
    assert raised.value.field == "expired_at"


def test_an_expired_at_in_range_makes_an_event() -> None:
    event = SessionEvent.from_outbox(expired_entry(0, "1767225600.5"))  # type: ignore[arg-type]
    assert event.expired_at == "2026-01-01T00:00:00.500Z"


async def metric(client: Client, name: str) -> float:
    resp = await client.get("/metrics")
    assert resp.status == 200
    for family in text_string_to_metric_families(await resp.text()):
        for s in family.samples:
            if s.name == name:
                return float(s.value)
    raise AssertionError(f"{name} not in /metrics")


async def test_bad_entries_among_600_closes_are_set_aside_and_every_close_is_delivered_once(
    settings: Settings,
    redis: Redis,
    keys: Keys,
    client: Client,
    report_counts: Callable[..., None],
) -> None:
    sids = [f"session-{n:04d}" for n in range(CLOSES)]
    for sid in sids:
        await open_session(redis, keys, USER, sid, TOKEN)
    bad = bad_entries()
    # Every hundredth close, one entry written straight into the outbox: the bad ones,
    # and one whose os is not UTF-8 (published, with U+FFFD for those bytes).
    mixed_in = [[entry] for entry, _ in bad] + [[closed_entry(99, os=NOT_UTF8)]]
    scrapes: list[int] = []
    closing = True

    async def scrape() -> None:
        while closing:
            scrapes.append((await client.get("/metrics")).status)
            await asyncio.sleep(0.05)  # a scrape interval, not a wait for a state

    scraper = asyncio.create_task(scrape())
    replies = []
    for n, sid in enumerate(sids):
        if n % 100 == 50:
            await write_entries(redis, keys, mixed_in[n // 100])
        replies.append(
            asyncio.create_task(client.post(CLOSE_PATH, headers=app_headers(TOKEN, sid), data=BODY))
        )
        await asyncio.sleep(1 / RATE)  # the pace of arrivals
    statuses = [r.status for r in await asyncio.gather(*replies)]

    async def drained() -> bool:
        return await outbox_length(redis, keys) == 0

    try:
        await wait_until(drained, "the outbox to drain past the bad entries", within=30)
    finally:
        closing = False
        await scraper
    dead = await stream_entries(redis, keys.dead_letters)
    queue = Topology.from_settings(settings).queue("audit")
    delivered = await take_messages(settings.amqp_url, queue)
    subjects = [str(m["subject"]) for m in delivered]
    report_counts(
        closes=CLOSES,
        bad=len(bad),
        dead_letters=len(dead),
        delivered=len(delivered),
        distinct=len(set(subjects)),
        scrapes=len(scrapes),
    )
    assert statuses == [200] * CLOSES
    assert set(scrapes) == {200}
    # Nothing failed here, so any repeat would be a batch published again behind a bad
    # entry: each event exactly once.
    assert sorted(subjects) == sorted([*sids, "direct-00099"])
    (odd,) = [m for m in delivered if m["subject"] == "direct-00099"]
    assert odd["data"]["os"] == "Andr\ufffdoid\ufffd"  # type: ignore[index]
    assert [(f["event_id"], f["dead_letter_field"]) for _, f in dead] == [
        (str(entry["event_id"]), field) for entry, field in bad
    ]
    assert all(f["dead_letter_reason"] for _, f in dead)
    assert await metric(client, "outbox_dead_lettered_total") == len(bad)


async def test_metrics_answer_while_the_oldest_entry_holds_bytes_that_are_not_utf8(
    settings: Settings, redis: Redis, keys: Keys, amqp_cleanup: None, aiohttp_client: AiohttpClient
) -> None:
    await ensure_group(redis, keys)
    odd = closed_entry(0, os=NOT_UTF8)
    await write_entries(redis, keys, [odd])
    # No relay: the entry stays the oldest.
    app = create_app(dataclasses.replace(settings, relay_enabled=False, sweeper_enabled=False))
    client: Client = await aiohttp_client(app)
    await asyncio.wait_for(asyncio.shield(client.app[AMQP]), 10)
    assert await metric(client, "outbox_backlog") == 1
    assert await metric(client, "outbox_oldest_entry_age_seconds") >= 0
    api_redis = connect_redis(settings)
    try:
        try:
            assert await oldest_entry_age(api_redis, keys) >= 0
            ((_, fields),) = await stream_entries(api_redis, keys.outbox(entry_bucket(odd)))
        except UnicodeDecodeError as exc:
            pytest.fail(f"a read of the outbox failed on the entry's bytes: {exc}")
        assert fields["os"] == "Andr\ufffdoid\ufffd"
    finally:
        await api_redis.aclose()
