"""`sessionctl webhook add|remove|rotate-secret|list` and `sessionctl receiver
add|revoke`: the transmitter's receivers, as operators register them. A webhook's secret
is printed once and kept, to sign with (an HMAC needs the secret itself); an SSF
receiver's bearer token is printed once and only its SHA-256 is kept."""

from __future__ import annotations

import re
import secrets
import uuid

from session_close.events import EVENT_TYPES
from session_close.settings import Settings
from signals.schema import migrate_database
from signals.ssf import token_hash
from signals.store import Store, open_pool
from signals.urls import check_url
from signals.webhooks import new_secret

# How long the previous secret still signs after a rotation (Standard Webhooks: receivers
# move to the new one meanwhile).
KEEP_PREVIOUS_SECONDS = 24 * 3600


class AdminError(Exception):
    """A request sessionctl refuses; the message says why, and nothing was changed."""


def event_types(text: str | None) -> list[str]:
    """--events: comma-separated event types; none given means every type."""
    if text is None:
        return list(EVENT_TYPES)
    chosen = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(EVENT_TYPES))
    if unknown or not chosen:
        raise AdminError(f"--events takes {', '.join(EVENT_TYPES)}; got {text!r}")
    return list(dict.fromkeys(chosen))


def _id(kind: str, text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise AdminError(f"no {kind} {text!r}: ids are UUIDs") from None


# A receiver's name is its SETs' audience: printable, no spaces at either end.
_NAME = re.compile(r"^[^\s\x00-\x1f\x7f](?:[^\x00-\x1f\x7f]{0,126}[^\s\x00-\x1f\x7f])?$")


async def receiver_command(
    settings: Settings, command: str, *, name: str | None = None, receiver_id: str | None = None
) -> dict[str, object]:
    if command == "add" and not _NAME.match(name or ""):
        raise AdminError(f"--name must be 1 to 128 printable characters; got {name!r}")
    wanted = _id("receiver", receiver_id) if command == "revoke" and receiver_id else None
    await migrate_database(settings)
    async with open_pool(settings) as pool:
        store = Store(pool)
        if command == "add":
            token = secrets.token_urlsafe(32)
            added = await store.add_receiver(name or "", token_hash(token))
            if added is None:
                raise AdminError(f"a receiver named {name!r} exists")
            return {"receiverId": str(added), "name": name, "token": token}
        assert wanted is not None
        if not await store.revoke_receiver(wanted):
            raise AdminError(f"no receiver {receiver_id} (or it is revoked already)")
        return {"receiverId": receiver_id, "revoked": True}


async def webhook_command(
    settings: Settings,
    command: str,
    *,
    url: str | None = None,
    events: str | None = None,
    webhook_id: str | None = None,
) -> dict[str, object]:
    if command == "add":
        assert url is not None
        types = event_types(events)
        try:
            await check_url(url, allow_http=settings.signals_allow_http)
        except ValueError as exc:
            raise AdminError(f"--url {exc}") from None
    await migrate_database(settings)
    async with open_pool(settings) as pool:
        store = Store(pool)
        if command == "add":
            secret = new_secret()
            added = await store.add_webhook(url or "", secret, types)
            return {"webhookId": str(added), "url": url, "events": types, "secret": secret}
        if command == "list":
            return {
                "webhooks": [
                    {"webhookId": str(w.id), "url": w.url, "events": w.event_types}
                    for w in await store.webhooks()
                ]
            }
        assert webhook_id is not None
        wanted = _id("webhook", webhook_id)
        if command == "remove":
            if not await store.remove_webhook(wanted):
                raise AdminError(f"no webhook {webhook_id}")
            return {"webhookId": webhook_id, "removed": True}
        secret = new_secret()
        if not await store.rotate_secret(wanted, secret, KEEP_PREVIOUS_SECONDS):
            raise AdminError(f"no webhook {webhook_id}")
        return {
            "webhookId": webhook_id,
            "secret": secret,
            "previousSecretSignsForSeconds": KEEP_PREVIOUS_SECONDS,
        }
