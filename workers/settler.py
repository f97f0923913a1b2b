"""Where a worker's messages are settled: acked, dead-lettered or handed back.

Every message is held from its delivery until the broker is told what became of it, in
the order of its delivery tag on its channel. Acks that fall due together go out as one
`basic.ack(multiple=True)` covering the run of settled messages from the oldest one held,
and so never past a message still held: a multiple ack settles every unacked tag up to
its own on that channel. While the oldest held message is being worked on, the settled
ones behind it wait to share its frame; once it is marked as retrying (`retrying`), each
settled message behind it is acked alone, so a message in retry holds nobody else back.

A channel's delivery tags start again at 1 after a reconnect, so each channel has a
ledger of its own; a settle on a channel that has closed is lost, and the broker
redelivers that message (the effects are idempotent). Whoever settles is told how each
frame went through `on_told(frame, told)`, called once per frame.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from workers.delivery import DeliveredMessage, ack, nack, reject

log = logging.getLogger(__name__)

Disposition = Literal["ack", "dead_letter", "requeue"]

# Bounds one frame to the broker, so a dead broker cannot hold a settle (or shutdown) up.
BROKER_CALL_TIMEOUT_SECONDS = 2.0


@dataclass(slots=True, eq=False)
class Held:
    """A message from its delivery until the broker is told what became of it."""

    message: DeliveredMessage
    ledger: _Ledger
    tag: int
    delivered: float  # time.monotonic() at hold()
    disposition: Disposition | None = None
    retrying: bool = False  # it failed at least once and is being retried
    dead_letter: str = ""  # why it is dead-lettered: malformed or poison


OnTold = Callable[[list[Held], bool], None]


@dataclass(slots=True, eq=False)
class _Ledger:
    channel: object
    # Delivery tag -> held message, in delivery order (dicts keep insertion order).
    held: dict[int, Held] = field(default_factory=dict)
    flusher: asyncio.Task[None] | None = None


class Settler:
    def __init__(self, on_told: OnTold) -> None:
        self._on_told = on_told
        self._ledgers: dict[int, _Ledger] = {}

    def hold(self, message: DeliveredMessage) -> Held:
        """Record a delivery, in the order of delivery (before the handler's first await)."""
        channel = message.channel
        ledger = self._ledgers.get(id(channel))
        if ledger is None or ledger.channel is not channel:
            ledger = self._ledgers[id(channel)] = _Ledger(channel)
        tag = message.delivery_tag
        assert tag is not None  # consumed with manual acks
        held = ledger.held[tag] = Held(message, ledger, tag, time.monotonic())
        return held

    def settle(self, held: Held, disposition: Disposition) -> bool:
        """Decide what becomes of a held message; the broker is told from a task of the
        settler's, on the next loop iteration, so that the settles of one iteration share
        frames. False when it was already settled (the first disposition stays)."""
        if held.disposition is not None:
            return False
        held.disposition = disposition
        self._wake(held.ledger)
        return True

    def retrying(self, held: Held) -> None:
        """Mark a held message as retried: the settled ones behind it stop waiting for it."""
        if not held.retrying:
            held.retrying = True
            self._wake(held.ledger)

    async def drain(self) -> None:
        """Wait until every settled message's frame has been sent (or lost)."""
        while flushers := [ledger.flusher for ledger in self._ledgers.values() if ledger.flusher]:
            await asyncio.gather(*flushers, return_exceptions=True)

    def _wake(self, ledger: _Ledger) -> None:
        if ledger.flusher is None:
            ledger.flusher = asyncio.get_running_loop().create_task(self._flush(ledger))

    async def _flush(self, ledger: _Ledger) -> None:
        try:
            while (frame := _next_frame(ledger)) is not None:
                told = await _send(frame)
                for held in frame:
                    del ledger.held[held.tag]
                self._on_told(frame, told)
        finally:
            ledger.flusher = None
            if not ledger.held and self._ledgers.get(id(ledger.channel)) is ledger:
                del self._ledgers[id(ledger.channel)]


async def _send(frame: list[Held]) -> bool:
    """One frame: an ack of the run `frame` (multiple when longer than one), or the reject
    or nack of its one message. False when it was lost with the channel."""
    last = frame[-1]
    try:
        async with asyncio.timeout(BROKER_CALL_TIMEOUT_SECONDS):
            if last.disposition == "ack":
                await ack(last.message, multiple=len(frame) > 1)
            elif last.disposition == "dead_letter":
                await reject(last.message)
            else:
                await nack(last.message)
    except Exception as exc:
        log.warning(
            "worker lost the settle of messages with their channel",
            extra={"messages": len(frame), "error": repr(exc)},
        )
        return False
    return True


def _next_frame(ledger: _Ledger) -> list[Held] | None:
    """What to send next: the run of acks from the oldest held message, or the oldest's
    reject or nack. While the oldest is worked on, nothing (its settle wakes the flusher
    again); while it is retrying, the first settled message behind it, alone."""
    entries = iter(ledger.held.values())
    oldest = next(entries, None)
    if oldest is None:
        return None
    if oldest.disposition == "ack":
        run = [oldest]
        for held in entries:
            if held.disposition != "ack":
                break
            run.append(held)
        return run
    if oldest.disposition is not None:
        return [oldest]
    if not oldest.retrying:
        return None
    return next(([held] for held in entries if held.disposition is not None), None)
