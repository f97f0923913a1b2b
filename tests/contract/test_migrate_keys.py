"""`sessionctl migrate-keys` moves a store of key layout 1 to layout 2 (docs/redis.md,
"Moving a store to layout 2") without losing or changing anything, says what it moved,
moves nothing the second time, finishes what an interrupted run left, and refuses to run
while a relay is alive. Each test on a redis-server of its own."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
from redis.asyncio import Redis

from outbox.stream import ensure_group
from outbox.sweeper import Sweeper
from service.closer import CloseOutcome, CloseRequest, SessionCloser
from session_close.keys import OUTBOX_GROUP, Keys, bucket_of
from session_close.settings import Settings
from tests.support.layout1 import (
    Layout1Store,
    State,
    dump,
    expected_outboxes,
    user_id,
    write_layout1,
)
from tests.support.processes import redis_server, settings_env

USERS = 2500  # 10,000 sessions
Entries = list[tuple[str, dict[str, str]]]


@pytest.fixture
async def store(settings: Settings, tmp_path: Path) -> AsyncIterator[Settings]:
    """The test's settings, pointed at a redis-server of its own."""
    with redis_server(tmp_path) as url:
        yield dataclasses.replace(settings, redis_url=url)


@pytest.fixture
async def redis(store: Settings) -> AsyncIterator[Redis]:
    client = Redis.from_url(store.redis_url, decode_responses=True)
    yield client
    await client.aclose()


async def migrate(settings: Settings, *args: str, **env: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "session_close.cli", "migrate-keys", *args),
        env=settings_env(settings, **env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 40)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def migrated(settings: Settings, *args: str) -> dict[str, Any]:
    code, out, err = await migrate(settings, *args)
    assert code == 0, err
    return cast(dict[str, Any], json.loads(out))


def nothing_moved(printed: dict[str, Any]) -> bool:
    return not any(printed["moved"].values()) and printed["leftAlone"]["count"] == 0


async def assert_moved_whole(
    redis: Redis, keys: Keys, old: Layout1Store, before: State, since: float
) -> State:
    """Every key of `before` (the store in layout 1, dumped from `since` on) in layout 2,
    content unchanged, TTLs ending when they did, and no other key under the prefix; the
    store after."""
    after = await dump(redis, f"{keys.prefix}*")
    elapsed_ms = int((time.monotonic() - since) * 1000) + 50
    # Each key whole under its new name, with its TTL (the same deadline: RENAMENX).
    for key, new in old.renamed.items():
        kind, content, pttl = before[key]
        assert after[new][:2] == (kind, content), key
        if pttl == -1:
            assert after[new][2] == -1, key
        else:
            assert 0 <= pttl - after[new][2] <= elapsed_ms, (key, pttl, after[new][2])
    for key in old.unchanged:
        assert after[key][:2] == before[key][:2]
        assert before[key][2] - elapsed_ms <= after[key][2] <= before[key][2]
    # The index by the bucket of each session's user, scores unchanged.
    index: dict[str, dict[str, float]] = {}
    for sid, (uid, score) in old.indexed.items():
        index.setdefault(keys.expiry(bucket_of(uid)), {})[sid] = score
    assert {k: v[1] for k, v in after.items() if k.endswith("}:sessions:expiry")} == index
    # Each entry in its user's bucket, fields, order and id unchanged.
    outboxes = expected_outboxes(before[old.old("outbox:session.closed")][1], keys)
    assert {k: v[1] for k, v in after.items() if k.endswith("}:outbox:session.closed")} == outboxes
    assert sum(len(e) for e in outboxes.values()) == old.counts["outboxEntries"]
    # Nothing else: no key of layout 1 is left.
    assert set(after) == set(old.renamed.values()) | old.unchanged | set(index) | set(outboxes)
    return after


async def test_a_store_of_10000_sessions_moves_to_layout_2_whole(
    store: Settings, redis: Redis, keys: Keys
) -> None:
    await redis.hset("elsewhere:session:sess-00000-0", mapping={"user_id": "not ours"})
    old = await write_layout1(redis, keys.prefix, USERS)
    # PTTLs are read from here on: the bound of how much they may have gone down.
    started = time.monotonic()
    before = await dump(redis, f"{keys.prefix}*")
    running = time.monotonic()
    printed = await migrated(store)
    took = time.monotonic() - running
    print(f"\nmigrate-keys of {len(before)} keys took {took:.1f}s and printed:\n{printed}")

    assert printed == {
        "moved": old.counts,
        "mergedIntoExisting": {},
        "alreadyThere": {},
        "dropped": {"expiryIndexEntriesWithoutSession": old.index_without_session},
        "outboxEntriesWithoutUserId": old.outbox_without_user_id,
        "unchanged": {"tokens": len(old.tokens), "deadLetters": 2, "relayHeartbeats": 0},
        "leftAlone": {"count": 0, "byReason": {}, "keys": []},
    }
    after = await assert_moved_whole(redis, keys, old, before, started)
    assert await redis.hgetall("elsewhere:session:sess-00000-0") == {"user_id": "not ours"}

    again = await migrated(store)
    print(f"a second run printed:\n{again}")
    assert nothing_moved(again)
    assert {k: v[:2] for k, v in (await dump(redis, f"{keys.prefix}*")).items()} == {
        k: v[:2] for k, v in after.items()
    }

    # The service closes a migrated session (its event in its user's bucket's outbox)
    # and knows a migrated tombstone.
    uid, sid = user_id(10), "sess-00010-1"
    closer = SessionCloser(redis, store)
    request = CloseRequest.new(old.tokens[uid, sid], sid, "Android", "1.0.1", "req-migrated")
    assert await closer.close(request) is CloseOutcome.CLOSED
    repeat = CloseRequest.new(old.tokens[uid, sid], "gone-00010-0", None, None, "req-tomb")
    assert await closer.close(repeat) is CloseOutcome.ALREADY_CLOSED
    await closer.drain()
    stream = keys.outbox(bucket_of(uid))
    last = cast(Entries, await redis.xrevrange(stream, count=1))
    assert last[0][1]["event_id"] == request.event_id
    assert last[0][1]["session_id"] == sid
    assert await redis.hget(keys.tombstone(uid, sid), "user_id") == uid
    assert await redis.exists(keys.session(uid, sid)) == 0
    assert await redis.sismember(keys.user_sessions(uid), sid) == 0
    assert await redis.zscore(keys.expiry(bucket_of(uid)), sid) is None
    # The relays' group, created as a relay creates it, hands out the migrated entries.
    await ensure_group(redis, keys)
    read = cast(Any, await redis.xreadgroup(OUTBOX_GROUP, "new-relay", {stream: ">"}))
    migrated_ids = [entry_id for entry_id, _ in after[stream][1]]
    assert [entry_id for entry_id, _ in read[0][1]] == [*migrated_ids, last[0][0]]
    # The sweeper finds the sessions that came due meanwhile in their bucket's index.
    assert (await Sweeper(redis, store).sweep_once()).expired == len(old.due)
    for uid, sid in old.due:
        newest = await redis.xrevrange(keys.outbox(bucket_of(uid)), count=1)
        assert cast(Entries, newest)[0][1]["type"] == "session.expired"
        assert cast(Entries, newest)[0][1]["session_id"] == sid


async def cut_short(
    redis: Redis, keys: Keys, old: Layout1Store, at: str
) -> tuple[dict[str, int], Counter[str]]:
    """Leave the store as a run stopped during step `at` leaves it (the steps run in the
    order index, outbox, keys): what the next run finds already in layout 2 and counts
    as such, and what it finds moved (gone from layout 1) and does not count."""
    index = old.old("sessions:expiry")
    outbox = old.old("outbox:session.closed")
    entries = cast(Entries, await redis.xrange(outbox))
    gone: Counter[str] = Counter()
    # Index entries copied (and, the step over, removed from the old index).
    copied = 10 if at == "index" else len(old.indexed)
    for sid, (uid, score) in list(old.indexed.items())[:copied]:
        await redis.zadd(keys.expiry(bucket_of(uid)), {sid: score})
    if at == "index":
        return {"expiryIndexEntries": copied}, gone
    await redis.delete(index)
    gone["expiryIndexEntries"] = copied
    # Outbox entries written under their ids (the old stream deleted once all are).
    written = entries if at == "keys" else entries[: len(entries) // 2]
    for entry_id, fields in written:
        bucket = bucket_of(fields.get("user_id", ""))
        await redis.xadd(keys.outbox(bucket), fields, id=entry_id)  # type: ignore[arg-type]
    if at == "outbox":
        return {"outboxEntries": len(written)}, gone
    await redis.delete(outbox)
    gone["outboxEntries"] = len(written)
    for key, new in list(old.renamed.items())[::3]:
        await redis.rename(key, new)
        gone[old.kinds[key]] += 1
    return {}, gone


@pytest.mark.parametrize("at", ["index", "outbox", "keys"])
async def test_a_run_cut_short_is_finished_by_the_next(
    store: Settings, redis: Redis, keys: Keys, at: str
) -> None:
    old = await write_layout1(redis, keys.prefix, 50)
    # PTTLs are read from here on: the bound of how much they may have gone down.
    started = time.monotonic()
    before = await dump(redis, f"{keys.prefix}*")
    already, gone = await cut_short(redis, keys, old, at)

    printed = await migrated(store)
    print(f"\nafter a run cut short in its {at} step, migrate-keys printed:\n{printed}")
    assert printed["alreadyThere"] == already
    assert printed["moved"] == {
        kind: total - already.get(kind, 0) - gone[kind] for kind, total in old.counts.items()
    }
    assert printed["leftAlone"]["count"] == 0
    await assert_moved_whole(redis, keys, old, before, started)
    assert nothing_moved(await migrated(store))


async def test_what_layout_2_already_holds_is_kept(
    store: Settings, redis: Redis, keys: Keys
) -> None:
    """A login side already on layout 2 wrote a user's new session and re-registered a
    push token: the old set and push hash are merged into the new ones (the newer value
    kept). A session under both names with other content stays, named in the output,
    and so does a key no layout knows."""
    old = await write_layout1(redis, keys.prefix, 20)
    uid = user_id(7)
    await redis.sadd(keys.user_sessions(uid), "sess-new-0001")
    await redis.hset(keys.user_push(uid), "push-7-0", "sess-new-0001")
    clash = old.old("session:sess-00008-3")
    await redis.hset(old.renamed[clash], mapping={"user_id": user_id(8), "os": "iOS"})
    await redis.set(old.old("legacy:thing"), "1")

    printed = await migrated(store)
    print(f"\nwith layout 2 keys already there, migrate-keys printed:\n{printed}")
    assert printed["mergedIntoExisting"] == {"userSessionSets": 1, "pushHashes": 1}
    assert sorted(printed["leftAlone"]["keys"], key=lambda k: str(k["key"])) == [
        {"key": old.old("legacy:thing"), "reason": "not a key of layout 1"},
        {
            "key": clash,
            "reason": "its layout-2 key exists with other content",
            "detail": old.renamed[clash],
        },
    ]
    assert printed["moved"]["sessions"] == old.counts["sessions"] - 1
    assert await redis.smembers(keys.user_sessions(uid)) == {
        "sess-new-0001",
        *(f"sess-00007-{k}" for k in range(4)),
    }
    assert await redis.hgetall(keys.user_push(uid)) == {
        "push-7-0": "sess-new-0001",
        **{f"push-7-{k}": f"sess-00007-{k}" for k in range(1, 4)},
    }
    assert await redis.hget(clash, "os") == "Android"
    assert await redis.hget(old.renamed[clash], "os") == "iOS"
    again = await migrated(store)
    assert not any(again["moved"].values())
    assert again["leftAlone"]["count"] == 2


async def test_it_refuses_while_a_relay_is_alive_unless_forced(
    store: Settings, redis: Redis, keys: Keys
) -> None:
    await redis.set(keys.relay_heartbeat("relay-1"), "1", px=60_000)
    await redis.hset(keys.prefix + "session:sess-00001-0", mapping={"user_id": "u1"})
    code, out, err = await migrate(store)
    assert code != 0
    assert out == ""
    assert "relay is running" in err
    assert keys.relay_heartbeat("relay-1") in err
    assert await redis.exists(keys.prefix + "session:sess-00001-0") == 1
    printed = await migrated(store, "--force")
    assert printed["moved"]["sessions"] == 1
    assert printed["unchanged"]["relayHeartbeats"] == 1
    assert await redis.exists(keys.relay_heartbeat("relay-1")) == 1


async def test_it_refuses_a_cluster(store: Settings) -> None:
    code, out, err = await migrate(store, REDIS_CLUSTER="true")
    assert code != 0
    assert out == ""
    assert "single node or a Sentinel primary" in err


async def test_values_that_are_not_utf8_move_byte_for_byte(store: Settings, keys: Keys) -> None:
    """An `os` some writer got wrong moves as it is (a client that decodes would have
    written U+FFFD back); a key the service could never name (its sid or user id not
    UTF-8) is left alone and reported."""
    raw = Redis.from_url(store.redis_url)
    prefix = keys.prefix.encode()
    try:
        entry = {b"type": b"session.closed", b"user_id": b"u-1", b"os": b"\xff\xfeAndroid"}
        entry_id = await raw.xadd(prefix + b"outbox:session.closed", entry)  # type: ignore[arg-type]
        session = {b"user_id": b"u-1", b"os": b"\xc3(", b"expires_at": b"1900000000"}
        await raw.hset(prefix + b"session:sess-bytes-1", mapping=session)  # type: ignore[arg-type]
        await raw.zadd(prefix + b"sessions:expiry", {b"sess-bytes-1": 1900000000})
        await raw.hset(prefix + b"session:sess-\xff\xff-2", mapping={b"user_id": b"u-1"})
        await raw.hset(prefix + b"session:sess-bytes-3", mapping={b"user_id": b"u-\xff"})

        printed = await migrated(store)
        assert printed["moved"]["outboxEntries"] == 1
        assert printed["moved"]["sessions"] == 1
        assert printed["moved"]["expiryIndexEntries"] == 1
        assert printed["leftAlone"]["byReason"] == {
            "its name is not UTF-8": 1,
            "its user_id is not UTF-8": 1,
        }
        outbox = keys.outbox(bucket_of("u-1")).encode()
        assert await raw.xrange(outbox) == [(entry_id, entry)]
        assert await raw.hgetall(keys.session("u-1", "sess-bytes-1").encode()) == session
        assert await raw.exists(prefix + b"session:sess-\xff\xff-2") == 1
    finally:
        await raw.aclose()
