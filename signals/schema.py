"""The transmitter's tables, in the PostgreSQL schema SIGNALS_DB_SCHEMA, and the numbered
migrations that create and change them (`python -m signals migrate`).

Each migration runs once, recorded in `schema_migrations`; those a schema lacks run in
one transaction, under an advisory lock, so any number of processes can start together
(the transmitter's replicas, sessionctl) while one of them migrates. A migration is
never edited once released: a change is a new one.

- `webhooks`: Standard Webhooks receivers (URL, secrets newest first, event types).
  After a rotation the previous secret also signs, until `previous_until`.
- `events`: every session event the transmitter took from its queue, as its CloudEvent.
- `receivers` (SSF, each with a hashed bearer token) and their `streams` (delivery by
  push or poll, status enabled, paused or disabled).
- `deliveries`: one per event and webhook or stream, written in the transaction that
  records the event (a stream's carries its SET's `jti`, the same on every retry);
  `pending` until delivered (for a poll stream: acknowledged), `failed` after an answer
  that must not be retried.
  `next_attempt_at` is when it is due: a replica that takes it moves it one lease
  ahead, so a replica that dies mid-delivery leaves it due again after the lease.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import asyncpg

from session_close.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    description: str
    sql: str


MIGRATIONS = (
    Migration(
        1,
        "webhooks, SSF receivers and streams, events and their deliveries",
        """
        CREATE TABLE webhooks (
            id             uuid PRIMARY KEY,
            url            text NOT NULL,
            -- newest first; the older one signs too until previous_until (a rotation)
            secrets        text[] NOT NULL,
            previous_until timestamptz,
            event_types    text[] NOT NULL,
            created_at     timestamptz NOT NULL DEFAULT now()
        );
        CREATE TABLE receivers (
            id         uuid PRIMARY KEY,
            name       text NOT NULL UNIQUE,
            token_hash bytea NOT NULL UNIQUE,
            created_at timestamptz NOT NULL DEFAULT now(),
            revoked_at timestamptz
        );
        CREATE TABLE streams (
            id                   uuid PRIMARY KEY,
            receiver_id          uuid NOT NULL REFERENCES receivers ON DELETE CASCADE,
            delivery_method      text NOT NULL,
            endpoint_url         text,
            authorization_header text,
            events_requested     text[] NOT NULL,
            description          text,
            status               text NOT NULL DEFAULT 'enabled'
                                 CHECK (status IN ('enabled', 'paused', 'disabled')),
            status_reason        text,
            created_at           timestamptz NOT NULL DEFAULT now(),
            updated_at           timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX streams_receiver ON streams (receiver_id);
        CREATE TABLE events (
            event_id    uuid PRIMARY KEY,
            type        text NOT NULL,
            body        text NOT NULL,
            recorded_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX events_recorded ON events (recorded_at);
        CREATE TABLE deliveries (
            id              bigserial PRIMARY KEY,
            event_id        uuid NOT NULL REFERENCES events ON DELETE CASCADE,
            webhook_id      uuid REFERENCES webhooks ON DELETE CASCADE,
            stream_id       uuid REFERENCES streams ON DELETE CASCADE,
            jti             uuid,
            state           text NOT NULL DEFAULT 'pending'
                            CHECK (state IN ('pending', 'delivered', 'failed')),
            attempts        integer NOT NULL DEFAULT 0,
            next_attempt_at timestamptz NOT NULL DEFAULT now(),
            created_at      timestamptz NOT NULL DEFAULT now(),
            finished_at     timestamptz,
            last_status     integer,
            last_error      text,
            CHECK (num_nonnulls(webhook_id, stream_id) = 1),
            CHECK ((stream_id IS NULL) = (jti IS NULL)),
            UNIQUE (event_id, webhook_id),
            UNIQUE (event_id, stream_id),
            UNIQUE (stream_id, jti)
        );
        CREATE INDEX deliveries_webhook_due ON deliveries (webhook_id, next_attempt_at)
            WHERE state = 'pending';
        CREATE INDEX deliveries_stream_due ON deliveries (stream_id, next_attempt_at)
            WHERE state = 'pending';
        """,
    ),
)

LATEST = MIGRATIONS[-1].version


async def migrate(conn: asyncpg.Connection, schema: str) -> list[Migration]:
    """Apply the migrations `schema` lacks, in order; returns those applied."""
    applied: list[Migration] = []
    async with conn.transaction():
        # SIGNALS_DB_SCHEMA is validated as a plain lower-case identifier at start.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('signals.' || $1))", schema)
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await conn.execute(
            f"""CREATE TABLE IF NOT EXISTS "{schema}".schema_migrations (
                version     integer PRIMARY KEY,
                description text NOT NULL,
                applied_at  timestamptz NOT NULL DEFAULT now())"""
        )
        done = {
            row[0] for row in await conn.fetch(f'SELECT version FROM "{schema}".schema_migrations')
        }
        await conn.execute(f'SET LOCAL search_path TO "{schema}"')
        for migration in MIGRATIONS:
            if migration.version in done:
                continue
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, description) VALUES ($1, $2)",
                migration.version,
                migration.description,
            )
            applied.append(migration)
            log.info(
                "signals schema migrated",
                extra={"schema": schema, "version": migration.version},
            )
    return applied


async def migrate_database(settings: Settings) -> list[Migration]:
    """`migrate` on a connection of its own to DATABASE_URL."""
    conn = await asyncpg.connect(settings.database_url, timeout=10)
    try:
        return await migrate(conn, settings.signals_db_schema)
    finally:
        await conn.close()
