"""The fast checks of a well-formed close request (service/handlers.py) and of a
well-formed event (session_close/events.py) must never accept what the marshmallow schemas
reject: the schemas decide, the fast checks only save their cost."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from service.handlers import (
    _authorization,
    _body_errors,
    _errors,
    _headers,
    _plain_authorization,
    _plain_request,
)
from session_close.events import SessionEvent, _plain_event, read_errors

header_text = st.one_of(
    st.text(max_size=80),
    st.from_regex(r"[A-Za-z0-9._-]{6,12}", fullmatch=True),
    st.sampled_from(["1.0.10", "2.0.0-rc.1+build.5", "1.0", "01.0.0", "v1.0.0", "Android"]),
)
bodies = st.one_of(
    st.binary(max_size=40),
    st.sampled_from(
        [b'{ "requestContent": { } }', b'{"requestContent": []}', b"[]", b"{}", b"[" * 5000]
    ),
    st.dictionaries(
        st.sampled_from(["requestContent", "other"]),
        st.one_of(st.none(), st.integers(), st.dictionaries(st.text(max_size=3), st.integers())),
    ).map(lambda d: json.dumps(d).encode()),
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(["SessionID", "OS", "AppVersion"]), header_text), bodies)
def test_fast_check_accepts_only_what_the_schemas_accept(
    headers: dict[str, str], body: bytes
) -> None:
    if _plain_request(headers, body):
        assert not (_errors(_headers, headers) | _body_errors(body))


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.none(),
        st.text(max_size=30),
        st.from_regex(r"(?i:basic|bearer) [\x21-\x7e]{1,20}", fullmatch=True),
    )
)
def test_fast_authorization_check_agrees_with_the_schema(value: str | None) -> None:
    data = {} if value is None else {"Authorization": value}
    assert _plain_authorization(value) == (not _errors(_authorization, data))


def test_the_apps_request_takes_the_fast_path() -> None:
    headers = {"SessionID": "session-123", "OS": "Android", "AppVersion": "1.0.10"}
    assert _plain_request(headers, b'{ "requestContent": { } }')
    assert _plain_authorization("Basic some-token")


def test_a_body_nested_too_deep_for_the_parser_is_a_validation_error() -> None:
    assert _body_errors(b"[" * 16000) == {"body": ["Must be a JSON object."]}


GOOD_EVENT: dict[str, Any] = SessionEvent(
    event_id="0b7e3f0c-4b8a-4c5e-9d61-3f1a2b4c5d6e",
    session_id="session-1",
    user_id="user-1",
    closed_at="2026-01-01T00:00:00.000Z",
    os="Android",
    app_version=None,
    request_id="r1",
).to_cloudevent("/eliab/session-service")
GOOD_EXPIRED_EVENT: dict[str, Any] = SessionEvent(
    event_id="6f0b2a1c-0d4e-5b7a-8c9d-0e1f2a3b4c5d",
    session_id="session-2",
    user_id="user-1",
    closed_at="2026-01-01T00:00:01.000Z",
    os=None,
    app_version="1.0.0",
    request_id=None,
    type="session.expired",
    reason="expired",
    expired_at="2026-01-01T00:00:00.000Z",
).to_cloudevent("/eliab/session-service")

json_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.text(max_size=12),
    st.sampled_from(
        [
            "",
            "1.0",
            "session.closed",
            "session.expired",
            "application/json",
            "user_logout",
            "user_logout_all",
            "expired",
            "2026-01-01T00:00:00Z",
            "2026-01-01T00:00:00",  # no offset: not aware
            "2026-13-01T00:00:00Z",
            "2026-01-01 00:00:00+02:00",
            "0B7E3F0C-4B8A-4C5E-9D61-3F1A2B4C5D6E",
            "0b7e3f0c4b8a4c5e9d613f1a2b4c5d6e",
            "0b7e3f0c-4b8a-4c5e-9d61-3f1a2b4c5d6",
            "{0b7e3f0c-4b8a-4c5e-9d61-3f1a2b4c5d6e}",
            "urn:uuid:0b7e3f0c-4b8a-4c5e-9d61-3f1a2b4c5d6e",
            "0b7e3f0c-4b8a-4c5e-9d61-3f1a2b4c5d6e\n",
            "x" * 65,  # an os past the API's bound
            "x" * 129,  # a requestId past it
            "x" * 257,  # a sessionId or appVersion past it
            "u\x00",  # nothing can store a NUL
            "0001-01-01T00:00:00+01:00",  # before year 1 once in UTC
            "9999-12-31T23:59:59-01:00",
            "0001-01-01T00:00:00-01:00",
        ]
    ),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@st.composite
def events(draw: st.DrawFn) -> dict[str, Any]:
    """The good event with a few of its fields (top level or in data) replaced, removed,
    or joined by unknown ones."""
    good = draw(st.sampled_from([GOOD_EVENT, GOOD_EXPIRED_EVENT]))
    event = {**good, "data": {**good["data"]}}
    for _ in range(draw(st.integers(1, 3))):
        target = event if draw(st.booleans()) else event.get("data")
        if not isinstance(target, dict):
            break
        known = [*sorted(target), "extra", "traceparent"]
        key = draw(st.one_of(st.sampled_from(known), st.text(max_size=5)))
        if draw(st.integers(0, 4)) == 0:
            target.pop(key, None)
        else:
            target[key] = draw(json_values)
    return event


@settings(max_examples=600, deadline=None)
@given(events())
def test_fast_event_check_accepts_only_what_the_schema_accepts(event: dict[str, Any]) -> None:
    if _plain_event(event):
        assert not read_errors(event)


def test_the_relays_event_takes_the_fast_path_with_or_without_a_traceparent() -> None:
    traced = {
        **GOOD_EVENT,
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    }
    for event in (GOOD_EVENT, traced, GOOD_EXPIRED_EVENT):
        assert _plain_event(event)
        assert not read_errors(event)
