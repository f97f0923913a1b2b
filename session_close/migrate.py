"""`sessionctl migrate-keys`: move a store written in key layout 1 (docs/redis.md, "Moving
a store to layout 2") to layout 2, once, while the API, its relays and sweepers are
stopped. Layout 1 only ever ran on a single node (or a Sentinel primary), so the store is
on one node, where a key may be renamed into any slot.

Tokens, dead letters and relay heartbeats have the same names in both layouts
(`Keys.token`, `Keys.dead_letters`, `Keys.relay_heartbeat`) and stay where they are.
Every other key of a user is renamed (RENAMENX: atomic, with its TTL, never over a key
that exists) to its name in its user's bucket; the expiry index and the outbox stream are
split entry by entry over the buckets. Each step is safe to interrupt and to run again:
a key is either still at its old name or already at its new one, an index entry is
removed from the old index only once the new one holds it, and an outbox entry keeps its
id in its bucket's stream (so a re-run recognises it there) and the old stream goes only
once every entry was written.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from session_close.keys import Keys, bucket_of

# What each kind is called in the printed counts.
SESSIONS = "sessions"
TOMBSTONES = "tombstones"
USER_SESSION_SETS = "userSessionSets"
PUSH_HASHES = "pushHashes"
CLOSE_ALL_RECORDS = "closeAllRecords"
EXPIRY_INDEX_ENTRIES = "expiryIndexEntries"
OUTBOX_ENTRIES = "outboxEntries"
KINDS = (
    SESSIONS,
    TOMBSTONES,
    USER_SESSION_SETS,
    PUSH_HASHES,
    CLOSE_ALL_RECORDS,
    EXPIRY_INDEX_ENTRIES,
    OUTBOX_ENTRIES,
)
# At most this many of the keys left alone are named in the output (all are counted).
NAMED_LEFT_ALONE = 100
# A close-all's id in its key: 32 hex digits derived from the request id.
_RUN = re.compile(rb"[0-9a-f]{32}")


class RelayAlive(Exception):
    """A relay's heartbeat is alive: the API or a relay still runs on this store."""


@dataclass(frozen=True, slots=True)
class Layout1:
    """The names of layout 1 that layout 2 changed (git history: docs/redis.md before
    layout 2), as bytes. Read here only: nothing writes them any more."""

    prefix: bytes

    def session(self, sid: bytes) -> bytes:
        return self.prefix + b"session:" + sid

    @property
    def expiry(self) -> bytes:
        return self.prefix + b"sessions:expiry"

    @property
    def outbox(self) -> bytes:
        return self.prefix + b"outbox:session.closed"


@dataclass(frozen=True, slots=True)
class Move:
    kind: str
    old: bytes
    new: str


@dataclass
class Report:
    moved: Counter[str] = field(default_factory=Counter)
    # The layout-2 key already existed (written meanwhile by a login side on layout 2):
    # a user's set or push hash gets the old members added, newer values kept.
    merged: Counter[str] = field(default_factory=Counter)
    # Found in layout 2 with the same content (left there by an interrupted run).
    already_there: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    outbox_entries_without_user_id: int = 0
    unchanged: Counter[str] = field(default_factory=Counter)
    # (key, why, what exactly): `why` one of a few phrases, counted by phrase.
    left_alone: list[tuple[str, str, str]] = field(default_factory=list)

    def leave(self, key: bytes, why: str, detail: str = "") -> None:
        self.left_alone.append((_shown(key), why, detail))

    def as_json(self) -> dict[str, object]:
        return {
            "moved": {kind: self.moved[kind] for kind in KINDS},
            "mergedIntoExisting": _nonzero(self.merged),
            "alreadyThere": _nonzero(self.already_there),
            "dropped": _nonzero(self.dropped),
            "outboxEntriesWithoutUserId": self.outbox_entries_without_user_id,
            "unchanged": {
                name: self.unchanged[name] for name in ("tokens", "deadLetters", "relayHeartbeats")
            },
            "leftAlone": {
                "count": len(self.left_alone),
                "byReason": dict(Counter(why for _, why, _ in self.left_alone)),
                "keys": [
                    {"key": key, "reason": why} | ({"detail": detail} if detail else {})
                    for key, why, detail in self.left_alone[:NAMED_LEFT_ALONE]
                ],
            },
        }


def _nonzero(counts: Counter[str]) -> dict[str, int]:
    return {kind: n for kind, n in counts.items() if n}


def _glob(text: bytes) -> bytes:
    """`text` as a literal in a SCAN MATCH pattern."""
    return re.sub(rb"([*?\[\]\\])", rb"\\\1", text)


def _shown(name: bytes | str) -> str:
    """A key or a reply as text: bytes that are not UTF-8 as \\x escapes."""
    return name.decode("utf-8", "backslashreplace") if isinstance(name, bytes) else name


def _text(value: Any) -> str | None:
    """A name or user id read from Redis, as the service reads it; None unless it is
    UTF-8 (the service could never build its key)."""
    if value is None:
        return None
    try:
        return bytes(value).decode()
    except UnicodeDecodeError:
        return None


def _stream_id(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


Entry = tuple[bytes, dict[bytes, bytes]]


class KeyMigration:
    """Given a client that does not decode replies (decode_responses off): names, fields
    and members are moved byte for byte, also where they are not UTF-8."""

    def __init__(self, redis: Redis, prefix: str, *, batch: int = 1000) -> None:
        self._redis = redis
        self._keys = Keys(prefix)
        self._prefix = prefix.encode()
        self._old = Layout1(self._prefix)
        self._batch = batch
        # The buckets whose outbox took an old entry under a new id (see _move_outbox_page).
        self._appending: set[int] = set()
        self.report = Report()

    async def run(self, *, force: bool = False) -> Report:
        heartbeats = await self._relay_heartbeats()
        if heartbeats and not force:
            raise RelayAlive(
                f"an outbox relay is running on this store (heartbeat {heartbeats[0]}"
                f"{f' and {len(heartbeats) - 1} more' if len(heartbeats) > 1 else ''}): "
                "stop the API, every relay and sweeper first (or pass --force)"
            )
        # The index first: its entries find their bucket through the session's user_id,
        # read from the session at its old name, which the key pass below renames.
        await self._move_expiry_index()
        await self._move_outbox()
        await self._move_keys()
        return self.report

    async def _relay_heartbeats(self) -> list[str]:
        match = _glob(self._keys.relay_heartbeat("").encode()) + b"*"
        found = self._redis.scan_iter(match=match, count=self._batch)
        return [_shown(key) async for key in found]

    async def _type(self, key: bytes) -> str:
        return _shown(await self._redis.type(key))

    async def _move_expiry_index(self) -> None:
        old = self._old.expiry
        kind = await self._type(old)
        if kind == "none":
            return
        if kind != "zset":
            self.report.leave(old, "not a sorted set", f"holds a {kind}")
            return
        seen: set[bytes] = set()  # ZSCAN may return a member twice
        cursor = 0
        while True:
            cursor, page = await self._redis.zscan(old, cursor, count=self._batch)
            members = cast(list[tuple[bytes, float]], page)
            fresh = [(sid, score) for sid, score in members if sid not in seen]
            seen.update(sid for sid, _ in fresh)
            await self._move_index_page(fresh)
            if cursor == 0:
                return

    async def _move_index_page(self, page: list[tuple[bytes, float]]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for sid, _ in page:
            pipe.type(self._old.session(sid))
            pipe.hget(self._old.session(sid), "user_id")
        found = await pipe.execute(raise_on_error=False)
        adds: list[tuple[bytes, str, float]] = []
        gone: list[bytes] = []
        for n, (sid, score) in enumerate(page):
            kind, uid = _shown(found[2 * n]), _text(found[2 * n + 1])
            if kind == "none":
                # The sweeper would drop it too: the session it points to is gone.
                gone.append(sid)
            elif kind != "hash" or uid is None:
                self.report.leave(
                    self._old.expiry + b" " + sid,
                    "its session has no user_id, so no bucket",
                    "the session stays too",
                )
            else:
                adds.append((sid, uid, score))
        pipe = self._redis.pipeline(transaction=False)
        for sid, uid, score in adds:
            # NX: a score in layout 2 was written after the migration started (a login
            # side already on layout 2 extended the session); it is the newer one.
            pipe.zadd(self._keys.expiry(bucket_of(uid)), {sid: score}, nx=True)
        done = list(gone)
        for (sid, uid, _), added in zip(
            adds, await pipe.execute(raise_on_error=False), strict=True
        ):
            if isinstance(added, Exception):
                self.report.leave(
                    self._old.expiry + b" " + sid,
                    "not written",
                    f"{self._keys.expiry(bucket_of(uid))}: {added}",
                )
                continue
            (self.report.moved if added else self.report.already_there)[EXPIRY_INDEX_ENTRIES] += 1
            done.append(sid)
        # Only what the new index holds (or what had no session) leaves the old one.
        if done:
            await self._redis.zrem(self._old.expiry, *done)
        self.report.dropped["expiryIndexEntriesWithoutSession"] += len(gone)

    async def _move_outbox(self) -> None:
        """Every entry of the old stream, fields unchanged, to the outbox of its user's
        bucket, in the old order and under its old id (ids only need to grow within a
        stream): a re-run finds the entries an interrupted run wrote by their id. The old
        stream, and its group, go only once all are written; the relays' group on each
        bucket's stream starts at 0 (ensure_group), so they publish every one."""
        old = self._old.outbox
        kind = await self._type(old)
        if kind == "none":
            return
        if kind != "stream":
            self.report.leave(old, "not a stream", f"holds a {kind}")
            return
        last = await self._last_ids()
        failed = 0
        start = b"-"
        while True:
            page = cast(list[Entry], await self._redis.xrange(old, start, "+", count=self._batch))
            if not page:
                break
            failed += await self._move_outbox_page(page, last)
            start = b"(" + page[-1][0]
        if failed:
            self.report.leave(old, "entries not written: the stream stays", f"{failed} entries")
        else:
            await self._redis.delete(old)

    async def _last_ids(self) -> list[tuple[int, int]]:
        """Each bucket's outbox's last id: an entry's old id can be kept where it is
        greater (XADD refuses any other)."""
        pipe = self._redis.pipeline(transaction=False)
        for outbox in self._keys.outboxes:
            pipe.xinfo_stream(outbox)
        last: list[tuple[int, int]] = []
        for info in await pipe.execute(raise_on_error=False):
            # No such key: an empty bucket. A key of another type fails at XADD.
            last.append(
                (0, 0) if isinstance(info, Exception) else _stream_id(info["last-generated-id"])
            )
        return last

    async def _move_outbox_page(self, page: list[Entry], last: list[tuple[int, int]]) -> int:
        """Write one page of old entries, in their order; returns how many failed."""
        users = [fields.get(b"user_id") for _, fields in page]
        self.report.outbox_entries_without_user_id += sum(1 for uid in users if not uid)
        # The bucket the service gives the user id it reads (`sessionctl outbox replay`).
        buckets = [bucket_of(uid.decode("utf-8", "replace")) if uid else 0 for uid in users]
        # An entry at or below its bucket's last id was written under its id by an
        # interrupted run, or (layout 2 written before the migration) cannot keep its id.
        below = [
            n for n, (entry_id, _) in enumerate(page) if _stream_id(entry_id) <= last[buckets[n]]
        ]
        pipe = self._redis.pipeline(transaction=False)
        for n in below:
            pipe.xrange(self._keys.outbox(buckets[n]), page[n][0], page[n][0])
        there = {
            n
            for n, found in zip(below, await pipe.execute(raise_on_error=False), strict=True)
            if isinstance(found, list) and found and found[0][1] == page[n][1]
        }
        self.report.already_there[OUTBOX_ENTRIES] += len(there)
        written: list[int] = []
        pipe = self._redis.pipeline(transaction=False)
        for n, (entry_id, fields) in enumerate(page):
            bucket = buckets[n]
            if n in there:
                continue
            if bucket in self._appending or _stream_id(entry_id) <= last[bucket]:
                # Its id cannot be kept: a new one after what the bucket holds, and so
                # for every later entry of the bucket, to keep their order.
                self._appending.add(bucket)
                pipe.xadd(self._keys.outbox(bucket), fields)  # type: ignore[arg-type]
            else:
                pipe.xadd(self._keys.outbox(bucket), fields, id=entry_id)  # type: ignore[arg-type]
                last[bucket] = _stream_id(entry_id)
            written.append(n)
        failed = 0
        for n, result in zip(written, await pipe.execute(raise_on_error=False), strict=True):
            if isinstance(result, Exception):
                failed += 1
                self.report.leave(
                    self._old.outbox + b" " + page[n][0],
                    "not written",
                    f"{self._keys.outbox(buckets[n])}: {result}",
                )
            else:
                self.report.moved[OUTBOX_ENTRIES] += 1
        return failed

    async def _move_keys(self) -> None:
        """One SCAN over the prefix: each key of layout 1 is renamed to its name in
        layout 2 (layout 2's own keys all start with a bucket's tag, `{b`, and are
        passed over)."""
        seen: set[bytes] = set()  # SCAN may return a key twice
        match = _glob(self._prefix) + b"*"
        cursor = 0
        while True:
            cursor, found = await self._redis.scan(cursor, match=match, count=self._batch)
            fresh = [k for k in cast(list[bytes], found) if k not in seen]
            seen.update(fresh)
            await self._move_batch(fresh)
            if cursor == 0:
                return

    async def _move_batch(self, found: Iterable[bytes]) -> None:
        moves: list[Move] = []
        by_user: list[tuple[str, bytes, str]] = []  # (kind, key, sid) of sessions, tombstones
        for key in found:
            kind, name = self._classify(key[len(self._prefix) :])
            if kind == "layout2":
                continue
            if kind in ("tokens", "relayHeartbeats"):
                self.report.unchanged[kind] += 1
            elif kind == "deadLetters":
                self.report.unchanged[kind] += await self._redis.xlen(key)
            elif kind == "":
                self.report.leave(key, "not a key of layout 1")
            elif name is None:
                self.report.leave(key, "its name is not UTF-8")
            elif kind in (SESSIONS, TOMBSTONES):
                by_user.append((kind, key, name))
            elif kind in (USER_SESSION_SETS, PUSH_HASHES, CLOSE_ALL_RECORDS):
                moves.append(Move(kind, key, self._new_user_key(kind, name)))
        moves += await self._session_moves(by_user)
        await self._rename(moves)

    def _classify(self, rest: bytes) -> tuple[str, str | None]:
        """The kind of a key (without the prefix) and what names it in layout 2: a
        session's or tombstone's sid, a user's id (with ":"+run for a close-all). By the
        name alone: a tombstone, `session:closed:<sid>`, is no session `session:<sid>`
        (a sid has no ":")."""
        if rest.startswith(b"{b"):
            return "layout2", ""
        if rest.startswith(b"auth:token:"):
            return "tokens", ""
        if rest.startswith(b"outbox:relay:"):
            return "relayHeartbeats", ""
        if rest == b"outbox:dead-letters":
            return "deadLetters", ""
        if rest in (b"outbox:session.closed", b"sessions:expiry"):
            return "handled", ""  # what remains of them was counted by their own step
        if rest.startswith(b"session:closed:"):
            return TOMBSTONES, _text(rest.removeprefix(b"session:closed:"))
        if rest.startswith(b"session:") and b":" not in rest.removeprefix(b"session:"):
            return SESSIONS, _text(rest.removeprefix(b"session:"))
        if rest.startswith(b"user:"):
            # The user id may hold ":"; what ends the key names its kind.
            user = rest.removeprefix(b"user:")
            if user.endswith(b":sessions"):
                return USER_SESSION_SETS, _text(user.removesuffix(b":sessions"))
            if user.endswith(b":push"):
                return PUSH_HASHES, _text(user.removesuffix(b":push"))
            _, sep, run = user.rpartition(b":close-all:")
            if sep and _RUN.fullmatch(run):
                return CLOSE_ALL_RECORDS, _text(user)
        return "", ""

    def _new_user_key(self, kind: str, name: str) -> str:
        if kind == USER_SESSION_SETS:
            return self._keys.user_sessions(name)
        if kind == PUSH_HASHES:
            return self._keys.user_push(name)
        uid, _, run = name.rpartition(":close-all:")
        return self._keys.close_all(uid, run)

    async def _session_moves(self, found: list[tuple[str, bytes, str]]) -> list[Move]:
        """Sessions and tombstones go to the bucket of the user_id they hold."""
        pipe = self._redis.pipeline(transaction=False)
        for _, key, _ in found:
            pipe.type(key)
            pipe.hget(key, "user_id")
        replies = await pipe.execute(raise_on_error=False)
        moves: list[Move] = []
        for n, (kind, key, sid) in enumerate(found):
            held, uid = _shown(replies[2 * n]), replies[2 * n + 1]
            if held == "none":
                self.report.dropped["expiredDuringMigration"] += 1
            elif held != "hash":
                self.report.leave(key, "not a hash", f"holds a {held}")
            elif uid is None:
                self.report.leave(key, "no user_id, so no bucket")
            elif _text(uid) is None:
                self.report.leave(key, "its user_id is not UTF-8", _shown(uid))
            elif kind == SESSIONS:
                moves.append(Move(kind, key, self._keys.session(uid.decode(), sid)))
            else:
                moves.append(Move(kind, key, self._keys.tombstone(uid.decode(), sid)))
        return moves

    async def _rename(self, moves: list[Move]) -> None:
        if not moves:
            return
        pipe = self._redis.pipeline(transaction=False)
        for move in moves:
            pipe.renamenx(move.old, move.new)
        for move, result in zip(moves, await pipe.execute(raise_on_error=False), strict=True):
            if isinstance(result, ResponseError) and "no such key" in str(result):
                self.report.dropped["expiredDuringMigration"] += 1
            elif isinstance(result, Exception):
                self.report.leave(move.old, "not renamed", f"to {move.new}: {result}")
            elif result:
                self.report.moved[move.kind] += 1
            else:
                await self._settle_existing(move)

    async def _settle_existing(self, move: Move) -> None:
        """The key's layout-2 name is taken: something wrote layout 2 meanwhile, or the
        same content is already there. A user's set gets the old members added and a
        push hash the old tokens that it lacks (what the login side wrote since is newer);
        a session, tombstone or close-all record whose new key holds something else is
        left where it is, for the operator to look at."""
        try:
            if move.kind == USER_SESSION_SETS:
                members = await self._redis.smembers(move.old)
                if members:
                    await self._redis.sadd(move.new, *members)
            elif move.kind == PUSH_HASHES:
                pipe = self._redis.pipeline(transaction=False)
                for token, sid in (await self._redis.hgetall(move.old)).items():
                    pipe.hsetnx(move.new, token, sid)
                await pipe.execute()
            else:
                old: Any = await self._redis.hgetall(move.old)
                if old != await self._redis.hgetall(move.new):
                    self.report.leave(
                        move.old, "its layout-2 key exists with other content", move.new
                    )
                    return
                self.report.already_there[move.kind] += 1
                await self._redis.delete(move.old)
                return
        except ResponseError as exc:
            self.report.leave(
                move.old, "its layout-2 key exists and cannot take it", f"{move.new}: {exc}"
            )
            return
        self.report.merged[move.kind] += 1
        await self._redis.delete(move.old)


async def migrate_keys(
    redis: Redis, prefix: str, *, force: bool = False, batch: int = 1000
) -> dict[str, object]:
    """Move the store under `prefix` from layout 1 to layout 2; what was moved, as JSON.
    Raises RelayAlive, unless `force`, while an outbox relay's heartbeat is alive."""
    migration = KeyMigration(redis, prefix, batch=batch)
    report = await migration.run(force=force)
    return report.as_json()
