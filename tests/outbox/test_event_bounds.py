"""An event built from an outbox entry stays within the API's bounds, so the consumers can
act on it: os and appVersion, which a close-all, an expiry or a close without the header
take from the login side's session hash, are cut to them."""

from __future__ import annotations

import uuid

import pytest

from session_close.events import APP_VERSION_MAX, OS_MAX, BadEntry, SessionEvent


def test_an_os_and_app_version_from_the_session_hash_are_cut_to_the_apis_bounds() -> None:
    entry = {
        "type": "session.closed",
        "reason": "user_logout_all",
        "event_id": str(uuid.uuid4()),
        "session_id": "session-long-os",
        "user_id": "u1",
        "closed_at": "2026-01-02T03:04:05.123Z",
        "os": "o" * 100_000,
        "app_version": "1.0.0-" + "a" * 1000,
        "request_id": "req-1",
    }
    try:
        event = SessionEvent.from_outbox(entry)
    except BadEntry as exc:  # the relay would set the close's event aside
        pytest.fail(f"an over-long os or appVersion made the entry a dead letter: {exc}")
    assert (event.os, event.app_version) == (
        "o" * OS_MAX,
        ("1.0.0-" + "a" * 1000)[:APP_VERSION_MAX],
    )
    assert SessionEvent.decode(event.encode("/eliab/session-service")) == event
