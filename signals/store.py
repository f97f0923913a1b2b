"""The transmitter's PostgreSQL statements (signals/schema.py has the tables): record
events with their deliveries, take due deliveries, settle them, and the webhooks
operators register with sessionctl.

Every statement names its tables through the connection's search_path, set to
SIGNALS_DB_SCHEMA when the pool opens a connection (`open_pool`).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

import asyncpg

from session_close.postgres import DB_TIMEOUT_SECONDS
from session_close.settings import Settings
from signals.sets import SESSION_REVOKED, VERIFICATION_TYPE

POOL_MAX_SIZE = 8


@asynccontextmanager
async def open_pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(
        settings.database_url,
        min_size=1,
        max_size=POOL_MAX_SIZE,
        timeout=DB_TIMEOUT_SECONDS,
        command_timeout=DB_TIMEOUT_SECONDS,
        # SIGNALS_DB_SCHEMA is validated as a plain lower-case identifier at start.
        server_settings={"search_path": f'"{settings.signals_db_schema}"'},
    )
    try:
        yield pool
    finally:
        await pool.close()


PUSH = "urn:ietf:rfc:8935"
POLL = "urn:ietf:rfc:8936"


@dataclass(frozen=True, slots=True)
class Target:
    """Where deliveries go: a webhook, or an SSF stream delivered by push."""

    kind: Literal["webhook", "stream"]
    id: uuid.UUID


@dataclass(frozen=True, slots=True)
class Due:
    """A delivery a replica took: it is this replica's until its lease ends."""

    id: int
    event_id: uuid.UUID
    event_type: str
    attempts: int  # this one included
    body: str  # the events row's
    created_at: float  # Unix time the delivery was written
    url: str
    receiver: str  # the metrics' and logs' name: webhook:<id>, or the SSF receiver's
    secrets: list[str]  # a webhook's secrets in use; none for a stream
    jti: str | None = None  # a stream's
    authorization: str | None = None  # a push stream's Authorization header, if it gave one


@dataclass(frozen=True, slots=True)
class Stream:
    """An SSF stream as its receiver configured it, with its receiver's name (its aud)."""

    id: uuid.UUID
    receiver_id: uuid.UUID
    audience: str
    delivery_method: str
    endpoint_url: str | None
    authorization_header: str | None
    events_requested: list[str]
    description: str | None
    status: str
    status_reason: str | None


@dataclass(frozen=True, slots=True)
class Polled:
    """A SET a poll returns: its delivery's jti and what its claims are made of."""

    jti: str
    event_type: str
    body: str
    created_at: float


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one attempt: delivered, retried after `retry_in` seconds, or
    failed for good (retry_in None and not delivered)."""

    delivery_id: int
    delivered: bool
    retry_in: float | None = None
    status: int | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Backlog:
    receiver: str
    pending: int
    oldest_seconds: float


@dataclass(frozen=True, slots=True)
class Webhook:
    id: uuid.UUID
    url: str
    event_types: list[str]


_STREAM_COLUMNS = """s.id, s.receiver_id, r.name, s.delivery_method, s.endpoint_url,
    s.authorization_header, s.events_requested, s.description, s.status, s.status_reason"""


def _stream(row: asyncpg.Record) -> Stream:
    return Stream(
        id=row[0],
        receiver_id=row[1],
        audience=row[2],
        delivery_method=row[3],
        endpoint_url=row[4],
        authorization_header=row[5],
        events_requested=list(row[6]),
        description=row[7],
        status=row[8],
        status_reason=row[9],
    )


class Store:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    # The intake and the delivery loop.

    async def record(self, events: Sequence[tuple[str, str, str]]) -> Sequence[int]:
        """Record events (id, type, CloudEvent JSON) and, in the same transaction, one
        pending delivery per webhook that takes the type and per stream (enabled or
        paused) that requested session-revoked. An event already recorded (a
        redelivered message) adds nothing. Per event, the deliveries it added."""
        ids = [event_id for event_id, _, _ in events]
        async with self._pool.acquire() as conn, conn.transaction():
            new = await conn.fetch(
                """INSERT INTO events (event_id, type, body)
                   SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[])
                   ON CONFLICT (event_id) DO NOTHING
                   RETURNING event_id, type""",
                ids,
                [event_type for _, event_type, _ in events],
                [body for _, _, body in events],
            )
            if not new:
                return [0] * len(events)
            added = await conn.fetch(
                """WITH e AS (SELECT * FROM unnest($1::uuid[], $2::text[]) AS e(event_id, type))
                   INSERT INTO deliveries (event_id, webhook_id, stream_id, jti)
                   SELECT e.event_id, w.id, NULL::uuid, NULL::uuid
                   FROM e JOIN webhooks w ON e.type = ANY (w.event_types)
                   UNION ALL
                   SELECT e.event_id, NULL, s.id, md5(s.id::text || '/' || e.event_id::text)::uuid
                   FROM e, streams s JOIN receivers r ON r.id = s.receiver_id
                   WHERE s.status <> 'disabled' AND r.revoked_at IS NULL
                     AND $3 = ANY (s.events_requested)
                   ON CONFLICT DO NOTHING
                   RETURNING event_id""",
                [row["event_id"] for row in new],
                [row["type"] for row in new],
                SESSION_REVOKED,
            )
        counts: dict[str, int] = {}
        for row in added:
            key = str(row["event_id"])
            counts[key] = counts.get(key, 0) + 1
        return [counts.get(str(uuid.UUID(event_id)), 0) for event_id in ids]

    async def due_targets(self) -> list[Target]:
        """The webhooks and enabled push streams with a delivery due now."""
        rows = await self._pool.fetch(
            """SELECT 'webhook' AS kind, webhook_id AS id FROM deliveries
               WHERE webhook_id IS NOT NULL AND state = 'pending' AND next_attempt_at <= now()
               GROUP BY webhook_id
               UNION ALL
               SELECT 'stream', d.stream_id FROM deliveries d JOIN streams s ON s.id = d.stream_id
               WHERE d.state = 'pending' AND d.next_attempt_at <= now()
                 AND s.status = 'enabled' AND s.delivery_method = $1
               GROUP BY d.stream_id""",
            PUSH,
        )
        return [Target(row["kind"], row["id"]) for row in rows]

    async def take(self, target: Target, limit: int, lease_seconds: float) -> list[Due]:
        """Take up to `limit` due deliveries of one target: each moves `lease_seconds`
        ahead and counts an attempt, so no other replica takes it meanwhile (SKIP LOCKED:
        replicas never wait on each other's rows). A stream's only while it is enabled."""
        column = "webhook_id" if target.kind == "webhook" else "stream_id"
        enabled = (
            ""
            if target.kind == "webhook"
            else "AND EXISTS (SELECT 1 FROM streams s WHERE s.id = $1 AND s.status = 'enabled')"
        )
        taken = f"""WITH taken AS (
                   UPDATE deliveries SET
                       next_attempt_at = now() + make_interval(secs => $3),
                       attempts = attempts + 1
                   WHERE id IN (
                       SELECT id FROM deliveries
                       WHERE {column} = $1 AND state = 'pending'
                         AND next_attempt_at <= now() {enabled}
                       ORDER BY next_attempt_at, id
                       LIMIT $2
                       FOR UPDATE SKIP LOCKED)
                   RETURNING id, event_id, attempts, created_at, jti)"""
        if target.kind == "webhook":
            rows = await self._pool.fetch(
                f"""{taken}
                   SELECT t.*, e.type, e.body, w.url, 'webhook:' || w.id AS receiver,
                          CASE WHEN w.previous_until > now() THEN w.secrets
                               ELSE w.secrets[1:1] END AS secrets,
                          NULL AS authorization_header
                   FROM taken t JOIN events e USING (event_id) JOIN webhooks w ON w.id = $1
                   ORDER BY t.id""",
                target.id,
                limit,
                lease_seconds,
            )
        else:
            rows = await self._pool.fetch(
                f"""{taken}
                   SELECT t.*, e.type, e.body, s.endpoint_url AS url, r.name AS receiver,
                          ARRAY[]::text[] AS secrets, s.authorization_header
                   FROM taken t JOIN events e USING (event_id)
                   JOIN streams s ON s.id = $1 JOIN receivers r ON r.id = s.receiver_id
                   ORDER BY t.id""",
                target.id,
                limit,
                lease_seconds,
            )
        return [
            Due(
                id=row["id"],
                event_id=row["event_id"],
                event_type=row["type"],
                attempts=row["attempts"],
                body=row["body"],
                created_at=row["created_at"].timestamp(),
                url=row["url"],
                receiver=row["receiver"],
                secrets=list(row["secrets"]),
                jti=None if row["jti"] is None else str(row["jti"]),
                authorization=row["authorization_header"],
            )
            for row in rows
        ]

    async def settle(self, outcomes: Sequence[Outcome]) -> None:
        """Write what became of attempts: delivered, due again later, or failed."""
        await self._pool.execute(
            """UPDATE deliveries d SET
                   state = CASE WHEN o.delivered THEN 'delivered'
                                WHEN o.retry_in IS NULL THEN 'failed'
                                ELSE 'pending' END,
                   next_attempt_at = CASE WHEN o.retry_in IS NULL THEN d.next_attempt_at
                                     ELSE now() + make_interval(secs => o.retry_in) END,
                   finished_at = CASE WHEN o.retry_in IS NULL THEN now() END,
                   last_status = o.status,
                   last_error = o.error
               FROM unnest($1::bigint[], $2::boolean[], $3::float8[], $4::int[], $5::text[])
                   AS o(id, delivered, retry_in, status, error)
               WHERE d.id = o.id AND d.state = 'pending'""",
            [o.delivery_id for o in outcomes],
            [o.delivered for o in outcomes],
            [o.retry_in for o in outcomes],
            [o.status for o in outcomes],
            [o.error for o in outcomes],
        )

    async def backlog(self) -> list[Backlog]:
        """Per webhook and per SSF receiver: pending deliveries and the oldest one's age."""
        rows = await self._pool.fetch(
            """SELECT 'webhook:' || w.id AS receiver, count(d.id) AS pending,
                      coalesce(extract(epoch FROM now() - min(d.created_at)), 0) AS oldest
               FROM webhooks w
               LEFT JOIN deliveries d ON d.webhook_id = w.id AND d.state = 'pending'
               GROUP BY w.id
               UNION ALL
               SELECT r.name, count(d.id),
                      coalesce(extract(epoch FROM now() - min(d.created_at)), 0)
               FROM receivers r
               LEFT JOIN streams s ON s.receiver_id = r.id
               LEFT JOIN deliveries d ON d.stream_id = s.id AND d.state = 'pending'
               WHERE r.revoked_at IS NULL
               GROUP BY r.name"""
        )
        return [Backlog(row[0], row[1], float(row[2])) for row in rows]

    async def purge(self, retention_seconds: int) -> int:
        """Forget events recorded more than `retention_seconds` ago, with their
        deliveries, pending or not; returns how many events went."""
        result = await self._pool.execute(
            """DELETE FROM events
               WHERE recorded_at < now() - make_interval(secs => $1::float8)""",
            float(retention_seconds),
        )
        return int(result.split()[-1])

    # Webhooks (sessionctl webhook).

    async def add_webhook(self, url: str, secret: str, event_types: Sequence[str]) -> uuid.UUID:
        webhook_id = uuid.uuid4()
        await self._pool.execute(
            "INSERT INTO webhooks (id, url, secrets, event_types) VALUES ($1, $2, $3, $4)",
            webhook_id,
            url,
            [secret],
            list(event_types),
        )
        return webhook_id

    async def rotate_secret(
        self, webhook_id: uuid.UUID, secret: str, keep_previous_seconds: float
    ) -> bool:
        """Sign with `secret` from now on, and with the current one too for
        `keep_previous_seconds`; False when there is no webhook of that id."""
        result = await self._pool.execute(
            """UPDATE webhooks SET
                   secrets = ARRAY[$2::text, secrets[1]],
                   previous_until = now() + make_interval(secs => $3::float8)
               WHERE id = $1""",
            webhook_id,
            secret,
            keep_previous_seconds,
        )
        return bool(result != "UPDATE 0")

    async def remove_webhook(self, webhook_id: uuid.UUID) -> bool:
        """Remove a webhook and its deliveries; False when there is none of that id."""
        result = await self._pool.execute("DELETE FROM webhooks WHERE id = $1", webhook_id)
        return bool(result != "DELETE 0")

    async def webhooks(self) -> list[Webhook]:
        rows = await self._pool.fetch(
            "SELECT id, url, event_types FROM webhooks ORDER BY created_at, id"
        )
        return [Webhook(row["id"], row["url"], list(row["event_types"])) for row in rows]

    # SSF receivers (sessionctl receiver) and their bearer tokens.

    async def add_receiver(self, name: str, token_hash: bytes) -> uuid.UUID | None:
        """A new receiver; None when the name is taken."""
        receiver_id = uuid.uuid4()
        result = await self._pool.execute(
            """INSERT INTO receivers (id, name, token_hash) VALUES ($1, $2, $3)
               ON CONFLICT (name) DO NOTHING""",
            receiver_id,
            name,
            token_hash,
        )
        return receiver_id if result == "INSERT 0 1" else None

    async def revoke_receiver(self, receiver_id: uuid.UUID) -> bool:
        """Its token stops working and its streams are disabled (their pending
        deliveries dropped); False when there is no such receiver not yet revoked."""
        async with self._pool.acquire() as conn, conn.transaction():
            result = await conn.execute(
                "UPDATE receivers SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL",
                receiver_id,
            )
            if result == "UPDATE 0":
                return False
            await conn.execute(
                """UPDATE streams SET status = 'disabled', status_reason = 'receiver revoked',
                       updated_at = now()
                   WHERE receiver_id = $1""",
                receiver_id,
            )
            await conn.execute(
                """DELETE FROM deliveries WHERE state = 'pending'
                   AND stream_id IN (SELECT id FROM streams WHERE receiver_id = $1)""",
                receiver_id,
            )
        return True

    async def receiver_of_token(self, token_hash: bytes) -> uuid.UUID | None:
        return await self._pool.fetchval(  # type: ignore[no-any-return]
            "SELECT id FROM receivers WHERE token_hash = $1 AND revoked_at IS NULL", token_hash
        )

    # SSF streams, each seen by its own receiver only.

    async def create_stream(
        self,
        receiver_id: uuid.UUID,
        *,
        delivery_method: str,
        endpoint_url: str | None,
        authorization_header: str | None,
        events_requested: Sequence[str],
        description: str | None,
    ) -> Stream:
        stream_id = uuid.uuid4()
        await self._pool.execute(
            """INSERT INTO streams (id, receiver_id, delivery_method, endpoint_url,
                   authorization_header, events_requested, description)
               VALUES ($1, $2, $3, $4, $5, $6, $7)""",
            stream_id,
            receiver_id,
            delivery_method,
            endpoint_url,
            authorization_header,
            list(events_requested),
            description,
        )
        stream = await self.stream(receiver_id, stream_id)
        assert stream is not None
        return stream

    async def streams(self, receiver_id: uuid.UUID) -> list[Stream]:
        rows = await self._pool.fetch(
            f"""SELECT {_STREAM_COLUMNS} FROM streams s JOIN receivers r ON r.id = s.receiver_id
                WHERE s.receiver_id = $1 ORDER BY s.created_at, s.id""",
            receiver_id,
        )
        return [_stream(row) for row in rows]

    async def stream(self, receiver_id: uuid.UUID, stream_id: uuid.UUID) -> Stream | None:
        row = await self._pool.fetchrow(
            f"""SELECT {_STREAM_COLUMNS} FROM streams s JOIN receivers r ON r.id = s.receiver_id
                WHERE s.receiver_id = $1 AND s.id = $2""",
            receiver_id,
            stream_id,
        )
        return None if row is None else _stream(row)

    async def update_stream(
        self,
        receiver_id: uuid.UUID,
        stream_id: uuid.UUID,
        *,
        delivery_method: str,
        endpoint_url: str | None,
        authorization_header: str | None,
        events_requested: Sequence[str],
        description: str | None,
    ) -> Stream | None:
        """Write the receiver-supplied members (the caller merged a PATCH)."""
        result = await self._pool.execute(
            """UPDATE streams SET delivery_method = $3, endpoint_url = $4,
                   authorization_header = $5, events_requested = $6, description = $7,
                   updated_at = now()
               WHERE receiver_id = $1 AND id = $2""",
            receiver_id,
            stream_id,
            delivery_method,
            endpoint_url,
            authorization_header,
            list(events_requested),
            description,
        )
        return None if result == "UPDATE 0" else await self.stream(receiver_id, stream_id)

    async def delete_stream(self, receiver_id: uuid.UUID, stream_id: uuid.UUID) -> bool:
        result = await self._pool.execute(
            "DELETE FROM streams WHERE receiver_id = $1 AND id = $2", receiver_id, stream_id
        )
        return bool(result != "DELETE 0")

    async def set_status(
        self, receiver_id: uuid.UUID, stream_id: uuid.UUID, status: str, reason: str | None
    ) -> Stream | None:
        """enabled delivers, paused holds (its events kept and delivered once enabled
        again), disabled neither sends nor keeps: its pending deliveries are dropped."""
        async with self._pool.acquire() as conn, conn.transaction():
            result = await conn.execute(
                """UPDATE streams SET status = $3, status_reason = $4, updated_at = now()
                   WHERE receiver_id = $1 AND id = $2""",
                receiver_id,
                stream_id,
                status,
                reason,
            )
            if result == "UPDATE 0":
                return None
            if status == "disabled":
                await conn.execute(
                    "DELETE FROM deliveries WHERE stream_id = $1 AND state = 'pending'",
                    stream_id,
                )
        return await self.stream(receiver_id, stream_id)

    async def request_verification(self, stream_id: uuid.UUID, body: str) -> None:
        """A verification event for one stream: an events row of its own and its
        delivery, delivered (pushed or polled) like any other."""
        event_id = uuid.uuid4()
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO events (event_id, type, body) VALUES ($1, $2, $3)",
                event_id,
                VERIFICATION_TYPE,
                body,
            )
            await conn.execute(
                """INSERT INTO deliveries (event_id, stream_id, jti)
                   VALUES ($1::uuid, $2::uuid,
                           md5($2::uuid::text || '/' || $1::uuid::text)::uuid)""",
                event_id,
                stream_id,
            )

    async def poll(
        self,
        stream_id: uuid.UUID,
        *,
        max_events: int,
        acks: Sequence[str],
        errors: Sequence[tuple[str, str]],
    ) -> tuple[list[Polled], bool, list[float]]:
        """RFC 8936 for one enabled poll stream: mark the acknowledged SETs delivered and
        those the receiver reported as failed, then return up to `max_events` pending
        SETs (oldest first), whether more are pending, and the ages of those acked."""
        async with self._pool.acquire() as conn, conn.transaction():
            acked = await conn.fetch(
                """UPDATE deliveries SET state = 'delivered', finished_at = now(),
                       attempts = attempts + 1
                   WHERE stream_id = $1 AND jti = ANY ($2::uuid[]) AND state = 'pending'
                   RETURNING extract(epoch FROM now() - created_at) AS age""",
                stream_id,
                list(acks),
            )
            if errors:
                await conn.execute(
                    """UPDATE deliveries d SET state = 'failed', finished_at = now(),
                           last_error = e.error
                       FROM unnest($2::uuid[], $3::text[]) AS e(jti, error)
                       WHERE d.stream_id = $1 AND d.jti = e.jti AND d.state = 'pending'""",
                    stream_id,
                    [jti for jti, _ in errors],
                    [error for _, error in errors],
                )
            rows = await conn.fetch(
                """SELECT d.jti, e.type, e.body, d.created_at FROM deliveries d
                   JOIN events e USING (event_id)
                   WHERE d.stream_id = $1 AND d.state = 'pending'
                   ORDER BY d.id LIMIT $2""",
                stream_id,
                max_events + 1,
            )
        polled = [
            Polled(str(row["jti"]), row["type"], row["body"], row["created_at"].timestamp())
            for row in rows[:max_events]
        ]
        return polled, len(rows) > max_events, [float(row["age"]) for row in acked]
