"""Closing sessions: the close requests of one event-loop iteration share one lookup of
their tokens (one round trip), then one run of close_sessions.lua per Redis node (on a
single node, one run for them all; on Redis Cluster, one per bucket, in one pipeline),
which is where redis.asyncio's per-command overhead goes away.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from enum import Enum
from typing import Any, cast

from redis.asyncio import Redis

from session_close import tracing
from session_close.batching import Batcher
from session_close.events import rfc3339_now
from session_close.keys import Keys, bucket_of
from session_close.redis_client import unavailable
from session_close.replication import run_replicated
from session_close.scripts import (
    CLOSE_ALL_SESSIONS,
    CLOSE_SESSIONS,
    USERS_OF_TOKENS,
    LuaScript,
    run_each,
)
from session_close.settings import Settings

MAX_BATCH = 256
# Fixed, so that the same request id always gives a close-all the same id.
CLOSE_ALL_NAMESPACE = uuid.UUID("0b9e4c1d-5f0a-4e57-8a43-2d6c9f1e7b35")


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
    # The request's W3C traceparent, carried into the event; "" when it sent none.
    traceparent: str = ""

    @classmethod
    def new(
        cls,
        token: str,
        session_id: str,
        os: str | None,
        app_version: str | None,
        request_id: str,
        traceparent: str | None = None,
    ) -> CloseRequest:
        return cls(
            token,
            session_id,
            os or "",
            app_version or "",
            request_id,
            str(uuid.uuid4()),
            traceparent or "",
        )


@dataclass(frozen=True, slots=True)
class CloseAllRequest:
    token: str
    keep_session_id: str | None
    request_id: str
    traceparent: str | None


@dataclass(frozen=True, slots=True)
class CloseAllResult:
    outcome: CloseOutcome  # CLOSED, SESSION_NOT_FOUND (the session to keep) or UNKNOWN_TOKEN
    # Closed under this request id: by this request and by earlier attempts of it.
    closed: int = 0
    # Closed by this request alone.
    closed_now: int = 0


def _step_span(script: LuaScript) -> AbstractContextManager[tracing.Span]:
    """A client span of one Redis step, a child of the request's server span."""
    return tracing.tracer(__name__).start_as_current_span(
        f"redis {script.name}",
        kind=tracing.SpanKind.CLIENT,
        attributes={"db.system.name": "redis", "db.operation.name": "EVALSHA"},
    )


class SessionCloser:
    def __init__(self, redis: Redis, settings: Settings) -> None:
        self._redis = redis
        self._keys = Keys(settings.redis_key_prefix)
        self._ttl = settings.tombstone_ttl_seconds
        self._settings = settings
        # With REDIS_MIN_REPLICAS, a step also waits (bounded) for its replicas.
        self._timeout = settings.redis_timeout_seconds + (
            settings.redis_replica_timeout_seconds if settings.redis_min_replicas else 0
        )
        self._close_all_batch = settings.close_all_batch_size
        # A script run may declare keys of several slots only on a single node (or
        # behind Sentinel): there one run serves a whole batch, on a cluster one bucket.
        self._cluster = settings.redis_cluster
        # Capped so that a hanging Redis holds at most that many pool connections: the
        # relay and /readyz keep theirs, and closes answer 503 instead of piling up.
        self._batcher: Batcher[CloseRequest, CloseOutcome] = Batcher(
            self._run_batch, max_size=MAX_BATCH, max_in_flight=settings.close_batches_in_flight
        )

    async def close(self, request: CloseRequest) -> CloseOutcome:
        """Raises TimeoutError or a RedisError when Redis cannot answer in time."""
        # Also bounds the wait for a batch slot while every slot is taken.
        if tracing.ENABLED:
            return await self._traced_close(request)
        async with asyncio.timeout(self._timeout):
            return await self._batcher.submit(request)

    async def _traced_close(self, request: CloseRequest) -> CloseOutcome:
        """The close under a span of its Redis step: the batched script run as this
        request saw it, from joining a batch to its reply (a batch serves many requests;
        each has its own step span, the batch's size an attribute)."""
        with _step_span(CLOSE_SESSIONS) as span:
            async with asyncio.timeout(self._timeout):
                outcome = await self._batcher.submit(request)
            span.set_attribute("session_close.outcome", outcome.value)
            return outcome

    async def close_all(self, request: CloseAllRequest) -> CloseAllResult:
        """Log out everywhere, in runs of close_all_sessions.lua that each close at most
        CLOSE_ALL_BATCH_SIZE sessions (not batched with other requests: it is rare, and
        its cost grows with the user's sessions), yielding to the event loop between runs
        so that other requests' closes go on. Each run has the Redis timeout; raises like
        close()."""
        # One id per request id: a retry sent with the same X-Request-ID goes on counting
        # under it (and would give a session the first attempt missed the same event id).
        run = uuid.uuid5(CLOSE_ALL_NAMESPACE, request.request_id).hex
        async with asyncio.timeout(self._timeout):
            uid = cast(
                str | None, await self._redis.hget(self._keys.token(request.token), "user_id")
            )
        if uid is None:
            return CloseAllResult(CloseOutcome.UNKNOWN_TOKEN)
        bucket, keep = bucket_of(uid), request.keep_session_id or ""
        keys = [
            self._keys.outbox(bucket),
            self._keys.expiry(bucket),
            self._keys.user_sessions(uid),
            self._keys.close_all(uid, run),
            self._keys.session(uid, keep),
        ]
        args = [
            self._keys.tag(bucket),
            self._ttl,
            rfc3339_now(),
            uid,
            keep,
            run,
            request.request_id,
            request.traceparent or "",
            self._close_all_batch,
        ]
        cursor, first, closed_now = "0", True, 0
        while True:
            with _step_span(CLOSE_ALL_SESSIONS) if tracing.ENABLED else nullcontext():
                async with asyncio.timeout(self._timeout):
                    reply = await self._step(
                        CLOSE_ALL_SESSIONS, keys, [*args, cursor, "1" if first else "0"]
                    )
            outcome = CloseOutcome(reply[0])
            if outcome is not CloseOutcome.CLOSED:
                return CloseAllResult(outcome)
            n, total, cursor, done = reply[1:]
            closed_now += int(n)
            if int(done):
                return CloseAllResult(outcome, int(total), closed_now)
            first = False
            await asyncio.sleep(0)

    async def drain(self) -> None:
        await self._batcher.drain()

    async def _run_batch(
        self, requests: list[CloseRequest]
    ) -> Sequence[CloseOutcome | BaseException]:
        outcomes: list[CloseOutcome | BaseException] = [CloseOutcome.UNKNOWN_TOKEN] * len(requests)
        # One bound for the whole batch (each caller waits at most one loop iteration
        # before it starts): every caller of a batch that times out gets TimeoutError.
        async with asyncio.timeout(self._timeout):
            users = await self._users_of(requests)
            # The closes of a known token, by the script run they go to.
            runs: dict[int, list[int]] = {}
            for i, uid in enumerate(users):
                if isinstance(uid, Exception):
                    outcomes[i] = uid  # its token's key is of the wrong type: its own error
                elif uid is not None:
                    runs.setdefault(bucket_of(uid) if self._cluster else 0, []).append(i)
            if not runs:
                return outcomes
            closed_at = rfc3339_now()
            calls = [
                self._close_call(requests, users, members, closed_at) for members in runs.values()
            ]
            if len(calls) == 1:
                replies = [await self._step(CLOSE_SESSIONS, *calls[0])]
            else:
                replies = await run_each(self._redis, [(CLOSE_SESSIONS, *call) for call in calls])
        for members, reply in zip(runs.values(), replies, strict=True):
            for n, i in enumerate(members):
                # A run that failed as a whole fails each of its closes; a close that
                # failed inside Redis comes back as its own ResponseError.
                result = reply if isinstance(reply, BaseException) else reply[n]
                outcomes[i] = result if isinstance(result, BaseException) else CloseOutcome(result)
        return outcomes

    async def _users_of(self, requests: list[CloseRequest]) -> list[str | Exception | None]:
        """The user of each request's token (None for an unknown token, the error reply
        for a token key Redis cannot read as a hash), in one round trip: one script run on
        a single node, one HGET per token on a cluster (each token's key is in a slot of
        its own). An unreachable Redis raises."""
        tokens = [self._keys.token(r.token) for r in requests]
        if self._cluster:
            pipe = self._redis.pipeline(transaction=False)
            for key in tokens:
                pipe.hget(key, "user_id")
            users = await pipe.execute(raise_on_error=False)
        else:
            users = await USERS_OF_TOKENS(self._redis, tokens, [])
        for user in users:
            if isinstance(user, Exception) and unavailable(user):
                raise user
        return cast(list[str | Exception | None], users)

    def _close_call(
        self,
        requests: list[CloseRequest],
        users: list[str | Exception | None],
        members: list[int],
        closed_at: str,
    ) -> tuple[list[str], list[Any]]:
        """The KEYS and ARGV of one close_sessions.lua run over the given closes."""
        keys: list[str] = []
        args: list[Any] = [self._ttl, closed_at]
        for i in members:
            r, uid = requests[i], cast(str, users[i])
            bucket = bucket_of(uid)
            keys += (
                self._keys.outbox(bucket),
                self._keys.expiry(bucket),
                self._keys.session(uid, r.session_id),
                self._keys.tombstone(uid, r.session_id),
                self._keys.user_sessions(uid),
            )
            args += (
                uid,
                r.session_id,
                r.event_id,
                r.os,
                r.app_version,
                r.request_id,
                r.traceparent,
            )
        return keys, args

    def _step(self, script: LuaScript, keys: list[str], args: list[Any]) -> Awaitable[Any]:
        """One script run; with REDIS_MIN_REPLICAS, answered only once that many replicas
        hold it (one WAIT per run, so per batch), else NotReplicatedError (503). Not a
        coroutine itself, so the single-node path awaits the script as it always did."""
        if self._settings.redis_min_replicas:
            return run_replicated(script, self._redis, keys, args, self._settings)
        return script(self._redis, keys, args)
