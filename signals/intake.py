"""The transmitter's intake: the effect its worker applies to each batch of session
events from its own queue. One transaction records the events and a pending delivery
for every receiver that takes their type; the runner (workers/runner.py) acks the
messages only after it commits, so an event is never acked before its deliveries exist.
A redelivered message finds its event recorded and adds nothing. Once deliveries are
recorded, `on_recorded` wakes this process's delivery loop."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

from session_close.batching import split_on_content_failure
from session_close.events import SessionEvent
from session_close.logs import log_each
from session_close.postgres import TRANSIENT
from session_close.settings import Settings
from signals.store import Store
from workers.effect import Effect, EffectFactory, event_ids

log = logging.getLogger(__name__)


class Intake:
    def __init__(self, store: Store, settings: Settings, on_recorded: Callable[[], None]) -> None:
        self._store = store
        self._on_recorded = on_recorded
        self._source = settings.event_source
        self._record_or_split = split_on_content_failure(self._record, self.transient)

    def transient(self, exc: BaseException) -> bool:
        return isinstance(exc, TRANSIENT)

    async def apply(self, events: list[SessionEvent]) -> list[BaseException | None]:
        results = await self._record_or_split(events)
        if any(isinstance(added, int) and added for added in results):
            self._on_recorded()
        log_each(
            log,
            logging.INFO,
            "signals recorded event",
            [
                {**event_ids(event), "deliveries": added}
                for event, added in zip(events, results, strict=True)
                if not isinstance(added, BaseException)
            ],
        )
        return [r if isinstance(r, BaseException) else None for r in results]

    async def _record(self, events: list[SessionEvent]) -> Sequence[int]:
        return await self._store.record(
            [(e.event_id, e.type, e.encode(self._source).decode()) for e in events]
        )


def open_intake(store: Store, on_recorded: Callable[[], None]) -> EffectFactory:
    """The runner's effect factory, over the transmitter's own store."""

    @asynccontextmanager
    async def opened(settings: Settings) -> AsyncIterator[Effect]:
        yield Intake(store, settings, on_recorded)

    return opened
