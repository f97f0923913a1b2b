"""The delivery loop: every webhook and push stream with deliveries due gets a task of its
own, which takes a few of them at a time (store.take: a lease, SKIP LOCKED), sends them
at once, and writes what became of each (store.settle). So a receiver that is down or
hangs holds only its own task: the others go on at their own pace.

A webhook gets the event's CloudEvent, signed by Standard Webhooks (signals/webhooks.py);
a push stream gets its SET (RFC 8935: `application/secevent+jwt`, the stream's
Authorization header if it gave one). An attempt is delivered on any 2xx. A network
error, a timeout, 429 or 5xx is retried after a capped exponential backoff
(DELIVERY_RETRY), or after the receiver's Retry-After when that is later (up to
RETRY_AFTER_CAP_SECONDS). Any other answer, a redirect included (never followed), fails
the delivery for good, with the answer kept.

A delivery is due again once its lease ends: a replica that dies mid-delivery, or that
cannot write the outcome, leaves it to be sent again after LEASE_SECONDS, with the same
`webhook-id` or `jti`. Delivery is at least once; receivers deduplicate by that id.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import functools
import logging
import time

import aiohttp
import orjson

from session_close import tracing
from session_close.postgres import TRANSIENT
from session_close.retry import Backoff, Policy, pause
from signals import sets, webhooks
from signals.metrics import SignalsMetrics
from signals.sets import Signer
from signals.store import Due, Outcome, Store, Target

log = logging.getLogger(__name__)

# An attempt's whole time, connect to last byte of the answer.
ATTEMPT_TIMEOUT_SECONDS = 5.0
# A taken delivery is this replica's for this long: longer than an attempt and the write
# of its outcome, short enough that a dead replica's work resumes within 10 s.
LEASE_SECONDS = ATTEMPT_TIMEOUT_SECONDS + 3.0
TAKE_LIMIT = 16  # deliveries of one receiver sent at once
# How often the loop looks for receivers with deliveries due. The replica that records
# an event wakes it at once (`wake`); the others find the event within this long.
POLL_SECONDS = 0.5
DELIVERY_RETRY = Policy(first=1.0, cap=60.0)
RETRY_AFTER_CAP_SECONDS = 3600.0
OUTAGE = Policy(first=0.5, cap=5.0)  # PostgreSQL unreachable
ANSWER_KEPT = 200  # characters of a failed answer's body kept for operators


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delay-seconds or an HTTP date), if valid."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    with contextlib.suppress(TypeError, ValueError):
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    return None


class Deliverer:
    def __init__(
        self,
        store: Store,
        metrics: SignalsMetrics,
        session: aiohttp.ClientSession,
        signer: Signer,
        issuer: str,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._session = session
        self._signer = signer
        self._issuer = issuer
        self._targets: dict[Target, asyncio.Task[None]] = {}
        self._stopping = asyncio.Event()
        self._woken = asyncio.Event()

    def wake(self) -> None:
        """New deliveries were recorded: look for them now, not at the next poll."""
        self._woken.set()

    def stop(self) -> None:
        """Take nothing more; `run` returns once the attempts in flight are settled."""
        self._stopping.set()
        self._woken.set()

    async def run(self, shutdown_timeout: float) -> None:
        """Until stop(): start a task for each webhook and stream with deliveries due.
        Stopping, the
        attempts in flight get `shutdown_timeout` seconds to finish and be written (one
        cut short is sent again after its lease)."""
        backoff = Backoff(OUTAGE)
        try:
            while not self._stopping.is_set():
                try:
                    due = await self._store.due_targets()
                except TRANSIENT as exc:
                    delay = backoff.next_delay()
                    log.warning(
                        "signals could not read due deliveries; retrying",
                        extra={"error": repr(exc), "delay": delay},
                    )
                    await pause(delay)
                    continue
                backoff.reset()
                for target in due:
                    if target not in self._targets:
                        task = asyncio.create_task(self._deliver(target))
                        self._targets[target] = task
                        task.add_done_callback(functools.partial(self._done, target))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(POLL_SECONDS):
                        await self._woken.wait()
                self._woken.clear()
            if self._targets:
                await asyncio.wait(self._targets.values(), timeout=shutdown_timeout)
        finally:
            for task in self._targets.values():
                task.cancel()
            await asyncio.gather(*self._targets.values(), return_exceptions=True)

    def _done(self, target: Target, _: asyncio.Task[None]) -> None:
        self._targets.pop(target, None)

    async def _deliver(self, target: Target) -> None:
        """Send this target's due deliveries until none is left."""
        ids = {"target": target.kind, "target_id": str(target.id)}
        try:
            while not self._stopping.is_set() and (
                taken := await self._store.take(target, TAKE_LIMIT, LEASE_SECONDS)
            ):
                outcomes = await asyncio.gather(*(self._attempt(due) for due in taken))
                await self._store.settle(outcomes)
        except TRANSIENT as exc:
            # What was taken is due again once its lease ends.
            log.warning(
                "signals could not reach PostgreSQL mid-delivery",
                extra={**ids, "error": repr(exc)},
            )
        except Exception:
            log.exception("signals delivery failed", extra=ids)

    def _request(self, due: Due) -> tuple[bytes, dict[str, str]]:
        """What one attempt sends: a webhook's signed CloudEvent, or a stream's SET."""
        if due.jti is None:
            body = due.body.encode()
            return body, webhooks.headers(due.secrets, str(due.event_id), int(time.time()), body)
        claims = sets.claims(
            issuer=self._issuer,
            audience=due.receiver,
            jti=due.jti,
            iat=int(due.created_at),
            event_type=due.event_type,
            body=due.body,
        )
        headers = {"Content-Type": "application/secevent+jwt", "Accept": "application/json"}
        if due.authorization:
            headers["Authorization"] = due.authorization
        return self._signer.sign(claims).encode(), headers

    async def _attempt(self, due: Due) -> Outcome:
        if not tracing.ENABLED:
            return await self._send(due)
        # With tracing on: a client span per attempt in the event's trace (its parent the
        # close's span, from the event's traceparent); the lines logged carry its ids.
        traceparent = orjson.loads(due.body).get("traceparent")
        span = tracing.tracer(__name__).start_span(
            "signals deliver",
            context=tracing.parent_context(traceparent),
            kind=tracing.SpanKind.CLIENT,
            attributes={
                "signals.receiver": due.receiver,
                "signals.attempt": due.attempts,
                "messaging.message.id": str(due.event_id),
            },
        )
        with tracing.trace.use_span(span, end_on_exit=True):
            outcome = await self._send(due)
            if not outcome.delivered:
                span.set_status(tracing.StatusCode.ERROR, outcome.error or str(outcome.status))
        return outcome

    async def _send(self, due: Due) -> Outcome:
        body, headers = self._request(due)
        ids: dict[str, object] = {
            "receiver": due.receiver,
            "event_id": str(due.event_id),
            "jti": due.jti,
            "attempt": due.attempts,
        }
        try:
            async with self._session.post(
                due.url,
                data=body,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=ATTEMPT_TIMEOUT_SECONDS),
            ) as answer:
                status = answer.status
                text = (await answer.text(errors="replace"))[:ANSWER_KEPT]
                later = retry_after(answer.headers.get("Retry-After"))
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return self._retry(due, ids, None, repr(exc) or type(exc).__name__, None)
        if 200 <= status < 300:
            seconds = time.time() - due.created_at
            self._metrics.attempted(due.receiver, "delivered", seconds)
            log.info("signal delivered", extra={**ids, "status": status})
            return Outcome(due.id, delivered=True, status=status)
        if status == 429 or status >= 500:
            return self._retry(due, ids, status, text, later)
        self._metrics.attempted(due.receiver, "failed")
        log.warning("signal refused; not retried", extra={**ids, "status": status})
        return Outcome(due.id, delivered=False, status=status, error=text)

    def _retry(
        self,
        due: Due,
        ids: dict[str, object],
        status: int | None,
        error: str,
        later: float | None,
    ) -> Outcome:
        delay = DELIVERY_RETRY.delay(due.attempts)
        if later is not None:
            delay = max(delay, min(later, RETRY_AFTER_CAP_SECONDS))
        self._metrics.attempted(due.receiver, "retried")
        log.warning(
            "signal not delivered; retrying",
            extra={**ids, "status": status, "error": error, "delay": round(delay, 3)},
        )
        return Outcome(due.id, delivered=False, retry_in=delay, status=status, error=error)
