"""sessionctl: write tokens, sessions and push tokens in the Redis form of docs/redis.md,
as the login side does (for demos, tests, and the login side to copy); list or replay
the outbox entries the relay set aside as dead letters (docs/operations.md); move a
store of key layout 1 to layout 2 (migrate-keys, session_close/migrate.py); and register
the transmitter's webhooks and SSF receivers (signals/admin.py)."""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import time
from collections.abc import Callable
from typing import cast

from redis.asyncio import Redis, RedisCluster
from redis.typing import EncodableT, FieldT

from session_close import __version__
from session_close.events import APP_VERSION_MAX, OS_MAX, SESSION_ID_RE
from session_close.keys import DEAD_LETTER_FIELDS, Keys, bucket_of
from session_close.migrate import RelayAlive, migrate_keys
from session_close.redis_client import connect_redis
from session_close.settings import Settings, env_help, settings_or_exit


async def create_token(redis: Redis, keys: Keys, user_id: str, token: str, ttl: int) -> None:
    key = keys.token(token)
    await redis.hset(key, mapping={"user_id": user_id})
    await redis.expire(key, ttl)


async def create_session(
    redis: Redis,
    keys: Keys,
    user_id: str,
    session_id: str,
    *,
    ttl: int,
    os: str = "",
    app_version: str = "",
    device_id: str = "",
    push_token: str = "",
    expiry_grace: int | None = None,
) -> None:
    """Write a session the way the login side does. With `expiry_grace` (the new way), the
    session also gets `expires_at` = now + ttl and an entry in the expiry index, and its
    data lives `expiry_grace` seconds longer than that, so that the sweeper can still read
    it and publish its session.expired event. Without it (the old way), the hash simply
    dies with its Redis TTL and no event tells anyone."""
    now = time.time()
    fields: dict[FieldT, EncodableT] = {"user_id": user_id, "created_at": int(now)}
    fields |= {k: v for k, v in [("os", os), ("app_version", app_version)] if v}
    if device_id:
        fields["device_id"] = device_id
    expires_at = round(now + ttl, 3)
    if expiry_grace is not None:
        fields["expires_at"] = expires_at
    if isinstance(redis, RedisCluster):
        # redis-py runs each command queued in a cluster MULTI through asyncio.run, in a
        # thread of its own: a client not yet initialized would initialize there, with
        # connections bound to that short-lived loop, and the next command sent on one
        # of them fails ("Event loop is closed"). So: initialized on the caller's loop.
        await redis.initialize()
    # Every key of the session is in its user's bucket: one MULTI, on a cluster too.
    pipe = redis.pipeline(transaction=True)
    pipe.hset(keys.session(user_id, session_id), mapping=fields)
    pipe.expire(keys.session(user_id, session_id), ttl + (expiry_grace or 0))
    if expiry_grace is not None:
        pipe.zadd(keys.expiry(bucket_of(user_id)), {session_id: expires_at})
    pipe.sadd(keys.user_sessions(user_id), session_id)
    if push_token:
        pipe.hset(keys.user_push(user_id), push_token, session_id)
    await pipe.execute()


Entry = tuple[str, dict[str, str]]


async def _dead_letter_entries(
    redis: Redis, keys: Keys, start: str = "-", end: str = "+"
) -> list[Entry]:
    return cast(list[Entry], await redis.xrange(keys.dead_letters, start, end))


async def dead_letters(redis: Redis, keys: Keys) -> list[dict[str, object]]:
    """The dead-letter stream, oldest first: each entry's id and fields."""
    return [{"id": i, "fields": f} for i, f in await _dead_letter_entries(redis, keys)]


async def replay(
    redis: Redis, keys: Keys, ids: list[str] | None, changes: dict[str, str]
) -> dict[str, object]:
    """Move dead letters (all, or those of `ids`) back to the outbox of their user's
    bucket, as new entries with their own fields (the event id unchanged, so consumers
    still drop a repeat), with `changes` applied: written first, then removed from the
    dead letters (another slot), so one interrupted is replayed twice, never lost."""
    if ids is None:
        found = await _dead_letter_entries(redis, keys)
    else:
        found = [e for i in ids for e in await _dead_letter_entries(redis, keys, i, i)]
    pipe = redis.pipeline(transaction=False)
    for _, fields in found:
        entry = {k: v for k, v in fields.items() if k not in DEAD_LETTER_FIELDS} | changes
        pipe.xadd(keys.outbox(bucket_of(entry.get("user_id", ""))), entry)  # type: ignore[arg-type]
    new_ids = await pipe.execute()
    if found:
        await redis.xdel(keys.dead_letters, *(i for i, _ in found))
    replayed = {i for i, _ in found}
    return {
        "replayed": [
            {"id": i, "outboxId": new} for (i, _), new in zip(found, new_ids, strict=True)
        ],
        "missing": [i for i in ids or [] if i not in replayed],
    }


def _session_id(text: str) -> str:
    # The API's own rule: a session it would refuse to close is no use written.
    if SESSION_ID_RE.fullmatch(text) is None:
        raise argparse.ArgumentTypeError(
            "must be 8 to 256 characters of A-Z a-z 0-9 . _ - (the API refuses any other)"
        )
    return text


def _printable_up_to(most: int) -> Callable[[str], str]:
    """The API's bound on OS and AppVersion: events carry the session's own values."""

    def check(text: str) -> str:
        if len(text) > most or not text.isprintable():
            raise argparse.ArgumentTypeError(f"must be at most {most} printable characters")
        return text

    return check


def _change(text: str) -> tuple[str, str]:
    field, sep, value = text.partition("=")
    if not sep or not field:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    return field, value


async def _run(args: argparse.Namespace, settings: Settings) -> dict[str, object]:
    keys = Keys(settings.redis_key_prefix)
    # No re-sent command: a replay's MULTI run twice would append its entries twice. A
    # migration moves names, fields and members byte for byte: replies not decoded.
    redis = connect_redis(settings, resend=False, decode=args.command != "migrate-keys")
    try:
        if args.command == "token":
            token = args.token or secrets.token_urlsafe(32)
            await create_token(redis, keys, args.user, token, args.ttl)
            return {"userId": args.user, "token": token}
        if args.command == "session":
            sid = args.session or secrets.token_urlsafe(24)
            await create_session(
                redis,
                keys,
                args.user,
                sid,
                ttl=args.ttl,
                os=args.os,
                app_version=args.app_version,
                device_id=args.device,
                push_token=args.push_token,
                expiry_grace=None
                if args.no_expiry_index
                else settings.session_expiry_grace_seconds,
            )
            return {"userId": args.user, "sessionId": sid}
        if args.command == "migrate-keys":
            return await migrate_keys(
                redis, settings.redis_key_prefix, force=args.force, batch=args.batch_size
            )
        if args.command == "outbox":
            if args.outbox_command == "dead-letters":
                return {"deadLetters": await dead_letters(redis, keys)}
            return await replay(redis, keys, args.id, dict(args.set))
        sessions = sorted(await redis.smembers(keys.user_sessions(args.user)))
        push = await redis.hgetall(keys.user_push(args.user))
        # Push tokens are secrets: show how many each session holds, not the tokens.
        return {
            "userId": args.user,
            "sessions": sessions,
            "pushTokensBySession": {s: list(push.values()).count(s) for s in set(push.values())},
        }
    finally:
        await redis.aclose()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="sessionctl",
        description="Write access tokens, sessions and push tokens into Redis the way the "
        "login side does (the key table of docs/redis.md). Prints JSON.",
        epilog=env_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    token = sub.add_parser("token", help="create an access token for a user")
    token.add_argument("--user", required=True)
    token.add_argument("--token", help="the token (default: a new random one)")
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds")
    session = sub.add_parser("session", help="open a session for a user")
    session.add_argument("--user", required=True)
    session.add_argument(
        "--session",
        type=_session_id,
        help="the session id, 8 to 256 characters of A-Z a-z 0-9 . _ - (default: a new random one)",
    )
    session.add_argument(
        "--ttl",
        type=int,
        default=86400,
        help="lifetime in seconds: the session expires (and gets its session.expired event) "
        "this long from now; its data lives SESSION_EXPIRY_GRACE_SECONDS longer",
    )
    session.add_argument(
        "--no-expiry-index",
        action="store_true",
        help="write the session the old way: no expires_at, no expiry index, and no "
        "session.expired event when its Redis TTL ends it",
    )
    session.add_argument("--os", default="", type=_printable_up_to(OS_MAX))
    session.add_argument("--app-version", default="", type=_printable_up_to(APP_VERSION_MAX))
    session.add_argument("--device", default="", help="device id")
    session.add_argument("--push-token", default="", help="register this push token")
    listing = sub.add_parser("sessions", help="list a user's open sessions")
    listing.add_argument("--user", required=True)
    outbox = sub.add_parser("outbox", help="the outbox entries the relay set aside")
    outbox_sub = outbox.add_subparsers(dest="outbox_command", required=True)
    outbox_sub.add_parser(
        "dead-letters",
        help="list the dead letters: entries that could not become a valid event, each "
        "with dead_letter_reason, dead_letter_field and dead_letter_entry_id",
    )
    replaying = outbox_sub.add_parser(
        "replay",
        help="move dead letters back to the outbox (once the cause is fixed) for the relay "
        "to publish; those it still cannot read come back as dead letters",
    )
    replaying.add_argument(
        "--id", action="append", help="this dead letter only (repeatable; default: all)"
    )
    replaying.add_argument(
        "--set",
        action="append",
        type=_change,
        default=[],
        metavar="FIELD=VALUE",
        help="write FIELD (as the outbox entry names it, e.g. expired_at) with VALUE in the "
        "replayed entry; needs --id (repeatable)",
    )
    migrating = sub.add_parser(
        "migrate-keys",
        help="move a store written in key layout 1 to layout 2 (docs/redis.md), once, "
        "with the API, every relay and sweeper stopped",
        description="Move the keys under REDIS_KEY_PREFIX from key layout 1 to layout 2: "
        "sessions, tombstones, user sets, push hashes and close-all records renamed into "
        "their user's bucket with their TTL, the expiry index and the outbox split over "
        "the buckets; tokens, dead letters and heartbeats keep their names. Run it with "
        "the API, every relay and sweeper stopped. It runs against the single Redis node "
        "or Sentinel primary that holds the store (layout 1 never ran on Redis Cluster), "
        "never with REDIS_CLUSTER=true. Safe to run again: a second run moves nothing, "
        "and a run that was interrupted is finished by the next. Prints what it moved, "
        "and what it left alone and why.",
    )
    migrating.add_argument(
        "--force",
        action="store_true",
        help="run even though an outbox relay's heartbeat is alive (a relay still running "
        "on layout 1 would go on writing the old keys)",
    )
    migrating.add_argument(
        "--batch-size", type=int, default=1000, help="keys or entries per SCAN and pipeline"
    )
    webhook = sub.add_parser(
        "webhook",
        help="the transmitter's Standard Webhooks receivers (docs/signals.md)",
        description="Register, list, re-key or remove the plain HTTP receivers the "
        "transmitter (python -m signals) posts every session event to, signed by Standard "
        "Webhooks. Stored in PostgreSQL (DATABASE_URL, schema SIGNALS_DB_SCHEMA).",
    )
    webhook_sub = webhook.add_subparsers(dest="webhook_command", required=True)
    adding = webhook_sub.add_parser(
        "add", help="register an endpoint; prints its webhookId and secret (shown once)"
    )
    adding.add_argument(
        "--url",
        required=True,
        help="https URL of a public address (http or a local one only with "
        "SIGNALS_ALLOW_HTTP=true)",
    )
    adding.add_argument(
        "--events",
        help="comma-separated event types (default: session.closed,session.expired)",
    )
    for name, text in (
        ("remove", "remove an endpoint and its pending deliveries"),
        (
            "rotate-secret",
            "give an endpoint a new secret (printed once); the previous one also signs "
            "for 24 hours, so the receiver can switch meanwhile",
        ),
    ):
        webhook_sub.add_parser(name, help=text).add_argument("--id", required=True)
    webhook_sub.add_parser("list", help="the endpoints registered (no secrets)")
    receiver = sub.add_parser(
        "receiver",
        help="the transmitter's Shared Signals receivers (docs/signals.md)",
        description="Issue or revoke the bearer token an SSF receiver uses on the "
        "transmitter's endpoints (it then creates its streams itself). Stored in "
        "PostgreSQL (DATABASE_URL, schema SIGNALS_DB_SCHEMA); only the token's SHA-256 is "
        "kept.",
    )
    receiver_sub = receiver.add_subparsers(dest="receiver_command", required=True)
    receiver_sub.add_parser(
        "add", help="a new receiver; prints its receiverId and token (shown once)"
    ).add_argument("--name", required=True, help="unique; its SETs' audience (aud)")
    receiver_sub.add_parser(
        "revoke", help="its token stops working and its streams are disabled"
    ).add_argument("--id", required=True)
    args = parser.parse_args(argv)
    if args.command == "outbox" and args.outbox_command == "replay" and args.set and not args.id:
        parser.error("--set needs --id: a correction is made entry by entry")
    if args.command == "migrate-keys" and args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    settings = settings_or_exit("sessionctl")
    if args.command == "migrate-keys" and settings.redis_cluster:
        sys.exit(
            "sessionctl migrate-keys: REDIS_CLUSTER=true, but a store of layout 1 is on a "
            "single node or a Sentinel primary: point REDIS_URL (or REDIS_SENTINELS) there"
        )
    if args.command in ("webhook", "receiver"):
        # The transmitter's own tables: imported only here, so that the Redis commands
        # need nothing of it.
        from signals.admin import AdminError, receiver_command, webhook_command

        try:
            if args.command == "webhook":
                printed = webhook_command(
                    settings,
                    args.webhook_command,
                    url=getattr(args, "url", None),
                    events=getattr(args, "events", None),
                    webhook_id=getattr(args, "id", None),
                )
            else:
                printed = receiver_command(
                    settings,
                    args.receiver_command,
                    name=getattr(args, "name", None),
                    receiver_id=getattr(args, "id", None),
                )
            print(json.dumps(asyncio.run(printed)))
        except AdminError as exc:
            sub_command = getattr(args, f"{args.command}_command")
            sys.exit(f"sessionctl {args.command} {sub_command}: {exc}")
        return
    try:
        print(json.dumps(asyncio.run(_run(args, settings))))
    except RelayAlive as exc:
        sys.exit(f"sessionctl migrate-keys: {exc}")


if __name__ == "__main__":
    main()
