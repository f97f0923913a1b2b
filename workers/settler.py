"""Where a worker's messages are settled: acked, dead-lettered or handed back.

Every message is held from its delivery until it is settled, in the order of its
delivery tag on its channel. Acks that fall due together go out as one
`basic.ack(multiple=True)` covering the run of settled messages from the oldest one held,
and so never past a message still held (say, one waiting to be retried): a multiple ack
settles every unacked tag up to its own on that channel. A settled message behind a held
one is acked alone, so a message in retry holds nobody else back.

A channel's delivery tags start again at 1 after a reconnect, so each channel has a
ledger of its own; a settle on a channel that has closed is lost, and the broker
redelivers that message (the effects are idempotent).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Literal

from workers.delivery import DeliveredMessage, ack, nack, reject
from workers.metrics import WorkerMetrics

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
    disposition: Disposition | None = None
    told: asyncio.Future[bool] | None = None


@dataclass(slots=True, eq=False)
class _Ledger:
    channel: object
    # Delivery tag -> held message, in delivery order (dicts keep insertion order).
    held: dict[int, Held] = field(default_factory=dict)
    flusher: asyncio.Task[None] | None = None


class Settler:
    def __init__(self, metrics: WorkerMetrics) -> None:
        self._metrics = metrics
        self._ledgers: dict[int, _Ledger] = {}

    def hold(self, message: DeliveredMessage) -> Held:
        """Record a delivery. Call it before the handler's first await, so that messages
        are held in the order of their tags."""
        channel = message.channel
        ledger = self._ledgers.get(id(channel))
        if ledger is None or ledger.channel is not channel:
            ledger = self._ledgers[id(channel)] = _Ledger(channel)
        assert message.delivery_tag is not None  # consumed with manual acks
        held = Held(message, ledger, message.delivery_tag)
        ledger.held[held.tag] = held
        return held

    async def settle(self, held: Held, disposition: Disposition) -> bool:
        """True once the broker has been told, False when the message's channel was lost
        (the broker then redelivers it). Settling twice keeps the first disposition."""
        if held.told is None:
            held.disposition = disposition
            held.told = asyncio.get_running_loop().create_future()
            ledger = held.ledger
            if ledger.flusher is None:
                # It starts on the next loop iteration: the other messages of a batch,
                # which resumed in this one, settle first and share the frame.
                ledger.flusher = asyncio.create_task(self._flush(ledger))
        return await asyncio.shield(held.told)

    async def _flush(self, ledger: _Ledger) -> None:
        try:
            while (frame := _next_frame(ledger)) is not None:
                await self._send(ledger, frame)
        finally:
            ledger.flusher = None
            if not ledger.held and self._ledgers.get(id(ledger.channel)) is ledger:
                del self._ledgers[id(ledger.channel)]

    async def _send(self, ledger: _Ledger, frame: list[Held]) -> None:
        """One frame: an ack of the run `frame` (multiple when longer than one), or the
        reject or nack of its one message."""
        last = frame[-1]
        try:
            async with asyncio.timeout(BROKER_CALL_TIMEOUT_SECONDS):
                if last.disposition == "ack":
                    await ack(last.message, multiple=len(frame) > 1)
                    self._metrics.ack_frame()
                elif last.disposition == "dead_letter":
                    await reject(last.message)
                else:
                    await nack(last.message)
            told = True
        except Exception as exc:
            log.warning(
                "worker lost the settle of messages with their channel",
                extra={"messages": len(frame), "error": repr(exc)},
            )
            told = False
        for held in frame:
            del ledger.held[held.tag]
            assert held.told is not None
            if not held.told.done():
                held.told.set_result(told)


def _next_frame(ledger: _Ledger) -> list[Held] | None:
    """What to send next: the run of acks from the oldest held message, or the oldest's
    reject or nack; while the oldest is still held, the first settled one behind it alone."""
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
    return next(([held] for held in entries if held.disposition is not None), None)
