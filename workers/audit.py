"""The audit worker: one row per event (session.closed, session.expired) in AUDIT_TABLE.

Rows are keyed by event id and inserted with ON CONFLICT DO NOTHING, so a redelivered
event (or one taken by a second copy of the worker) adds nothing. Each batch the runner
hands over is one INSERT; its messages are acked only after that commit. An INSERT that
PostgreSQL rejects for a row's content is split into one per event, so only the bad
event fails (and is retried, then dead-lettered by the runner).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import asyncpg
import orjson

from session_close.batching import split_on_content_failure
from session_close.events import SessionEvent
from session_close.logs import log_each, short_id
from session_close.postgres import DB_TIMEOUT_SECONDS, TRANSIENT
from session_close.retry import retry
from session_close.settings import Settings
from workers.effect import Effect, event_ids

log = logging.getLogger(__name__)

POOL_MAX_SIZE = 4


def create_table_sql(table: str) -> str:
    # AUDIT_TABLE is validated as a plain lower-case identifier at start.
    return f"""
        CREATE TABLE IF NOT EXISTS "{table}" (
            event_id    uuid PRIMARY KEY,
            session_id  text NOT NULL,
            user_id     text NOT NULL,
            closed_at   timestamptz NOT NULL,
            reason      text NOT NULL,
            os          text,
            app_version text,
            request_id  text,
            recorded_at timestamptz NOT NULL DEFAULT now()
        )"""


def insert_sql(table: str) -> str:
    # The batch is one jsonb parameter: asyncpg encodes eight arrays element by element
    # (an isinstance check of an abstract class each), PostgreSQL parses one document.
    return f"""
        INSERT INTO "{table}"
            (event_id, session_id, user_id, closed_at, reason, os, app_version, request_id)
        SELECT * FROM jsonb_to_recordset($1::jsonb) AS e(
            event_id uuid, session_id text, user_id text, closed_at timestamptz,
            reason text, os text, app_version text, request_id text)
        ON CONFLICT (event_id) DO NOTHING
        RETURNING event_id::text"""


async def ensure_table(pool: asyncpg.Pool, table: str) -> None:
    async with pool.acquire() as conn, conn.transaction():
        # Two workers starting together would otherwise race on CREATE TABLE IF NOT
        # EXISTS and one would fail on the catalog's unique index.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", table)
        await conn.execute(create_table_sql(table))


class AuditTrail:
    def __init__(self, pool: asyncpg.Pool, table: str) -> None:
        self._pool = pool
        self._insert = insert_sql(table)
        self._write_or_split = split_on_content_failure(self._write, self.transient)

    def transient(self, exc: BaseException) -> bool:
        return isinstance(exc, TRANSIENT)

    async def apply(self, events: list[SessionEvent]) -> list[BaseException | None]:
        results = await self._write_or_split(events)
        lines: dict[bool, list[dict[str, object]]] = {True: [], False: []}  # by inserted
        for event, inserted in zip(events, results, strict=True):
            if isinstance(inserted, BaseException):
                continue
            lines[inserted].append(
                {
                    **event_ids(event),
                    "session_id": short_id(event.session_id),
                    "user_id": event.user_id,
                    "closed_at": event.closed_at,
                    "os": event.os,
                    "app_version": event.app_version,
                    "duplicate": not inserted,
                }
            )
        log_each(log, logging.INFO, "session close audited", lines[True])
        log_each(log, logging.INFO, "session close already audited", lines[False])
        return [r if isinstance(r, BaseException) else None for r in results]

    async def _write(self, events: list[SessionEvent]) -> Sequence[bool]:
        """One INSERT for the batch; per event, whether its row is new."""
        rows = await self._pool.fetch(
            self._insert,
            orjson.dumps(
                [
                    {
                        "event_id": e.event_id,
                        "session_id": e.session_id,
                        "user_id": e.user_id,
                        # Decoding checked that it converts; sent in UTC, the one
                        # form orjson and PostgreSQL agree on whatever the offset.
                        "closed_at": datetime.fromisoformat(e.closed_at).astimezone(UTC),
                        "reason": e.reason,
                        "os": e.os,
                        "app_version": e.app_version,
                        "request_id": e.request_id,
                    }
                    for e in events
                ]
            ).decode(),
            timeout=DB_TIMEOUT_SECONDS,
        )
        new = {row[0] for row in rows}  # PostgreSQL writes uuids in lower case
        return [e.event_id.lower() in new for e in events]


async def keep_session(connection: asyncpg.Connection) -> None:
    """The pool's reset on release: nothing. The worker sets no session state (the
    advisory lock is per transaction), and asyncpg's default reset (RESET ALL, UNLISTEN,
    ...) was a round trip per batch and 6% of the worker's CPU."""


@asynccontextmanager
async def open_audit(settings: Settings) -> AsyncIterator[Effect]:
    async def start() -> asyncpg.Pool:
        pool = await asyncpg.create_pool(
            settings.database_url,
            min_size=1,
            max_size=POOL_MAX_SIZE,
            timeout=DB_TIMEOUT_SECONDS,
            command_timeout=DB_TIMEOUT_SECONDS,
            reset=keep_session,
        )
        try:
            await ensure_table(pool, settings.audit_table)
        except BaseException:
            pool.terminate()
            raise
        return pool

    pool = await retry("connecting to PostgreSQL", start)
    try:
        yield AuditTrail(pool, settings.audit_table)
    finally:
        try:
            async with asyncio.timeout(DB_TIMEOUT_SECONDS):
                await pool.close()
        except Exception:
            pool.terminate()
