"""A store written in key layout 1 (docs/redis.md before layout 2: one keyspace, one
outbox stream with its group `relay`, one expiry index), the way the login side and the
service of that layout wrote it, for the tests of `sessionctl migrate-keys`; and a dump of
every key under a prefix, to compare a store before and after."""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.typing import EncodableT, FieldT

from session_close.keys import OUTBOX_GROUP, Keys, bucket_of

SESSIONS_PER_USER = 4
# Key -> its type, its content and its PTTL (-1: none).
State = dict[str, tuple[str, Any, int]]


@dataclass
class Layout1Store:
    """What was written, and where layout 2 keeps each of it."""

    prefix: str
    # Old key -> its layout-2 name: every key that moves whole.
    renamed: dict[str, str] = field(default_factory=dict)
    # Old key -> its kind, as `sessionctl migrate-keys` counts them.
    kinds: dict[str, str] = field(default_factory=dict)
    # Keys that keep their name: tokens, the dead letters.
    unchanged: set[str] = field(default_factory=set)
    # The tokens of each (user, session).
    tokens: dict[tuple[str, str], str] = field(default_factory=dict)
    # sid -> (user, score) of the index entries whose session exists; and the others.
    indexed: dict[str, tuple[str, float]] = field(default_factory=dict)
    index_without_session: int = 0
    # (user, sid) of the sessions past their expires_at, not yet swept (the sweeper was
    # stopped for the migration).
    due: list[tuple[str, str]] = field(default_factory=list)
    outbox_without_user_id: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    def old(self, name: str) -> str:
        return f"{self.prefix}{name}"


def user_id(u: int) -> str:
    # Every tenth user id holds ":" (and a non-ASCII letter): the key names it.
    return f"org:{u % 7}:ü{u}" if u % 10 == 0 else f"user-{u}"


async def write_layout1(redis: Redis, prefix: str, users: int) -> Layout1Store:
    """`users` users of SESSIONS_PER_USER sessions each, every session with a token and a
    push token and three in four in the expiry index; a closed session (tombstone and
    pending outbox entry) for two users in five, a close-all record for one in 25,
    a session.expired entry for one in ten; index entries whose session is gone, outbox
    entries without a user_id, two dead letters. Half the outbox was read by a relay and
    not yet confirmed (pending in the group). One user in 500 has a session already past
    its expires_at, not yet swept."""
    store = Layout1Store(prefix)
    new = Keys(prefix)
    now = time.time()
    outbox = store.old("outbox:session.closed")
    await redis.xgroup_create(outbox, OUTBOX_GROUP, id="0", mkstream=True)
    pipe = redis.pipeline(transaction=False)
    for u in range(users):
        uid = user_id(u)
        push: dict[FieldT, EncodableT] = {}
        for k in range(SESSIONS_PER_USER):
            sid = f"sess-{u:05d}-{k}"
            key = store.old(f"session:{sid}")
            fields: dict[FieldT, EncodableT] = {
                "user_id": uid,
                "created_at": int(now),
                "os": "Android",
                "app_version": f"1.0.{k}",
                "device_id": f"dev-{u}-{k}",
            }
            if k < 3:
                expires_at = round(now + 3600 * (k + 1) + u / 1000, 3)
                if k == 0 and u % 500 == 1:
                    expires_at = round(now - 60, 3)
                    store.due.append((uid, sid))
                fields["expires_at"] = expires_at
                pipe.zadd(store.old("sessions:expiry"), {sid: expires_at})
                store.indexed[sid] = (uid, expires_at)
            pipe.hset(key, mapping=fields)
            pipe.expire(key, 3600 * (k + 2) if k < 3 else 86400)
            store.renamed[key] = new.session(uid, sid)
            store.kinds[key] = "sessions"
            token = f"tok-{u}-{k}"
            token_key = store.old(f"auth:token:{hashlib.sha256(token.encode()).hexdigest()}")
            pipe.hset(token_key, mapping={"user_id": uid})
            pipe.expire(token_key, 7200)
            store.unchanged.add(token_key)
            store.tokens[uid, sid] = token
            push[f"push-{u}-{k}"] = sid
        sessions = store.old(f"user:{uid}:sessions")
        pipe.sadd(sessions, *push.values())
        store.renamed[sessions] = new.user_sessions(uid)
        store.kinds[sessions] = "userSessionSets"
        pushes = store.old(f"user:{uid}:push")
        pipe.hset(pushes, mapping=push)
        store.renamed[pushes] = new.user_push(uid)
        store.kinds[pushes] = "pushHashes"
        if u % 5 < 2:
            sid, event_id = f"gone-{u:05d}-0", str(uuid.uuid4())
            tomb = store.old(f"session:closed:{sid}")
            tombstone: dict[FieldT, EncodableT] = {
                "user_id": uid,
                "event_id": event_id,
                "closed_at": "2026-12-01T10:00:00.000Z",
            }
            pipe.hset(tomb, mapping=tombstone)
            pipe.expire(tomb, 86400)
            store.renamed[tomb] = new.tombstone(uid, sid)
            store.kinds[tomb] = "tombstones"
            pipe.xadd(outbox, _entry("session.closed", "user_logout", event_id, sid, uid))
        if u % 25 == 0:
            run = uuid.uuid5(uuid.NAMESPACE_URL, uid).hex
            record = store.old(f"user:{uid}:close-all:{run}")
            pipe.hset(record, mapping={"closed": "3"})
            pipe.expire(record, 86400)
            store.renamed[record] = new.close_all(uid, run)
            store.kinds[record] = "closeAllRecords"
        if u % 10 == 3:
            sid = f"sess-{u:05d}-9"
            pipe.xadd(outbox, _entry("session.expired", "expired", str(uuid.uuid4()), sid, uid))
    for n in range(users // 50):
        pipe.zadd(store.old("sessions:expiry"), {f"lost-{n:05d}": now - 10})
    store.index_without_session = users // 50
    for n in range(3):
        # As a buggy writer might have left them: the relay sets such entries aside.
        entry = _entry("session.closed", "user_logout", str(uuid.uuid4()), f"anon-{n:04d}", "")
        del entry["user_id"]
        pipe.xadd(outbox, entry)
    store.outbox_without_user_id = 3
    dead = store.old("outbox:dead-letters")
    for n in range(2):
        letter: dict[FieldT, EncodableT] = {"type": "session.closed", "dead_letter_reason": "bad"}
        pipe.xadd(dead, letter | {"n": n})
    store.unchanged.add(dead)
    await pipe.execute()
    length = await redis.xlen(outbox)
    # A relay read half of the entries and died before the broker confirmed them.
    await redis.xreadgroup(OUTBOX_GROUP, "old-relay", {outbox: ">"}, count=length // 2)
    store.counts = {
        "sessions": users * SESSIONS_PER_USER,
        "tombstones": sum(1 for u in range(users) if u % 5 < 2),
        "userSessionSets": users,
        "pushHashes": users,
        "closeAllRecords": sum(1 for u in range(users) if u % 25 == 0),
        "expiryIndexEntries": len(store.indexed),
        "outboxEntries": length,
    }
    return store


def _entry(kind: str, reason: str, event_id: str, sid: str, uid: str) -> dict[FieldT, EncodableT]:
    """An outbox entry with the fields lib.lua's add_event writes."""
    return {
        "type": kind,
        "reason": reason,
        "event_id": event_id,
        "session_id": sid,
        "user_id": uid,
        "closed_at": "2026-12-01T10:00:00.000Z",
        "os": "Android",
        "app_version": "1.0.0",
        "request_id": "",
    }


def expected_outboxes(
    entries: list[tuple[str, dict[str, str]]], keys: Keys
) -> dict[str, list[tuple[str, dict[str, str]]]]:
    """The old stream's entries, split by their user's bucket (bucket 0 without a user)."""
    split: dict[str, list[tuple[str, dict[str, str]]]] = {}
    for entry_id, fields in entries:
        outbox = keys.outbox(bucket_of(fields.get("user_id", "")))
        split.setdefault(outbox, []).append((entry_id, fields))
    return split


async def dump(redis: Redis, match: str) -> State:
    """Every key matching `match`."""
    found = [k async for k in redis.scan_iter(match=match, count=1000)]
    pipe = redis.pipeline(transaction=False)
    for key in found:
        pipe.type(key)
    kinds = await pipe.execute()
    pipe = redis.pipeline(transaction=False)
    for key, kind in zip(found, kinds, strict=True):
        if kind == "hash":
            pipe.hgetall(key)
        elif kind == "set":
            pipe.smembers(key)
        elif kind == "zset":
            pipe.zrange(key, 0, -1, withscores=True)
        elif kind == "stream":
            pipe.xrange(key)
        else:
            pipe.get(key)
        pipe.pttl(key)
    replies = await pipe.execute()
    state: State = {}
    for n, (key, kind) in enumerate(zip(found, kinds, strict=True)):
        content, pttl = replies[2 * n], replies[2 * n + 1]
        if kind == "zset":
            content = dict(content)
        elif kind == "stream":
            content = [(entry_id, fields) for entry_id, fields in content]
        state[key] = (kind, content, pttl)
    return state
