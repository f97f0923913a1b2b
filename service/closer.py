"""Closing a session: one run of close_session.lua per request.

Concurrent requests of one event-loop iteration share one Redis pipeline (one round
trip), which is where redis.asyncio's per-command overhead goes away.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from core.batching import Batcher
from core.keys import Keys
from core.scripts import CLOSE_SESSION
from core.settings import Settings

MAX_BATCH = 256


class CloseOutcome(Enum):
    CLOSED = "closed"
    ALREADY_CLOSED = "already"
    SESSION_NOT_FOUND = "missing"
    UNKNOWN_TOKEN = "token"


@dataclass(frozen=True, slots=True)
class CloseRequest:
    token: str
    session_id: str
    os: str
    app_version: str
    request_id: str
    # Fixed per request, so a retried script run is recognised by the tombstone.
    event_id: str

    @classmethod
    def new(
        cls, token: str, session_id: str, os: str | None, app_version: str | None, request_id: str
    ) -> CloseRequest:
        return cls(token, session_id, os or "", app_version or "", request_id, str(uuid.uuid4()))


def rfc3339_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class SessionCloser:
    def __init__(self, redis: Redis, settings: Settings) -> None:
        self._redis = redis
        self._keys = Keys(settings.redis_key_prefix)
        self._ttl = settings.tombstone_ttl_seconds
        self._timeout = settings.redis_timeout_seconds
        self._batcher: Batcher[CloseRequest, CloseOutcome] = Batcher(
            self._run_batch, max_size=MAX_BATCH
        )

    async def close(self, request: CloseRequest) -> CloseOutcome:
        """Raises TimeoutError or a RedisError when Redis cannot answer in time."""
        return await self._batcher.submit(request)

    async def drain(self) -> None:
        await self._batcher.drain()

    async def _run_batch(
        self, requests: list[CloseRequest]
    ) -> Sequence[CloseOutcome | BaseException]:
        # One bound for the whole batch (each caller waits at most one loop iteration
        # before it starts): every caller of a batch that times out gets TimeoutError.
        async with asyncio.timeout(self._timeout):
            results = await self._execute(requests)
            if any(isinstance(r, NoScriptError) for r in results):
                # Redis lost its script cache (restart): none of these ran. Load, run again.
                await CLOSE_SESSION.load(self._redis)
                results = await self._execute(requests)
        return [r if isinstance(r, BaseException) else CloseOutcome(r) for r in results]

    async def _execute(self, requests: list[CloseRequest]) -> list[str | BaseException]:
        closed_at = rfc3339_now()
        pipe = self._redis.pipeline(transaction=False)
        for r in requests:
            CLOSE_SESSION.queue(
                pipe,
                [
                    self._keys.token(r.token),
                    self._keys.session(r.session_id),
                    self._keys.tombstone(r.session_id),
                    self._keys.outbox,
                ],
                [
                    self._keys.prefix,
                    r.session_id,
                    r.event_id,
                    self._ttl,
                    closed_at,
                    r.os,
                    r.app_version,
                    r.request_id,
                ],
            )
        results: list[str | BaseException] = await pipe.execute(raise_on_error=False)
        return results
