"""What a worker does with the events it is handed (its effect), and what every effect
shares: the ids its log lines carry."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from session_close import tracing
from session_close.events import SessionEvent
from session_close.settings import Settings


class Effect(Protocol):
    """What a worker does with events. It must be idempotent. Per event, `apply` returns
    None when it is done or the exception it failed with: MalformedEvent for an event it
    can never act on, one that `transient` accepts when its backend cannot be reached or
    is out of resources, anything else when the event itself failed. Raising fails every
    event of the call (a backend down, say)."""

    def transient(self, exc: BaseException) -> bool:
        """True when `exc` is the backend's, not the event's: retried without limit,
        logged without traceback."""
        ...

    async def apply(self, events: list[SessionEvent]) -> Sequence[BaseException | None]: ...


EffectFactory = Callable[[Settings], AbstractAsyncContextManager[Effect]]


def event_ids(event: SessionEvent) -> dict[str, str | None]:
    """The ids every line logged about an event carries: with tracing on, the trace and
    span of the worker's handling of it (while the runner handles it), else the trace id
    of its traceparent."""
    ids = {
        "request_id": event.request_id,
        "event_id": event.event_id,
        "trace_id": event.trace_id,
    }
    spans = tracing.EVENT_SPANS.get()
    if spans is not None and (span := spans.get(event.event_id)) is not None:
        ids |= tracing.ids_of(span)
    return ids
