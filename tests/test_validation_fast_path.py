"""The close handler's fast check of a well-formed request (service/handlers.py) must
never accept what the marshmallow schemas reject: they decide, it only saves their cost."""

from __future__ import annotations

import json

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
