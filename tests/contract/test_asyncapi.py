"""The events' contract in the repository: docs/asyncapi.json (AsyncAPI 3.0) and
docs/session-event.schema.json are generated from the schema the producer and the workers
validate with, lint clean, and describe exactly what the relay publishes."""

from __future__ import annotations

import json
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from session_close.asyncapi import build_document, dumps, event_json_schema
from session_close.events import SessionEvent, traceparent_of_request
from session_close.topology import ROUTING_KEYS
from tests.support.paths import ROOT
from tests.support.redocly import assert_lints_clean

DOCS = ROOT / "docs"


def test_the_committed_documents_are_the_generated_ones() -> None:
    """`make docs` regenerates them."""
    assert (DOCS / "asyncapi.json").read_text() == dumps(build_document())
    assert (DOCS / "session-event.schema.json").read_text() == dumps(event_json_schema())


def test_redocly_lint_with_the_recommended_rules_reports_no_error() -> None:
    assert_lints_clean("docs/asyncapi.json")


def test_a_channel_per_routing_key_the_topology_binds() -> None:
    document = build_document()
    assert document["asyncapi"] == "3.0.0"
    assert sorted(c["address"] for c in document["channels"].values()) == sorted(ROUTING_KEYS)
    for operation in document["operations"].values():
        assert operation["action"] == "send"


def relay_events() -> list[dict[str, Any]]:
    """What the relay publishes, built the way it builds them: from outbox entries as
    the close, close-all and sweeper scripts write them."""
    common = {
        "event_id": "0b7e3f0c-4b8a-4c5e-9d61-3f1a2b4c5d6e",
        "session_id": "session-1",
        "user_id": "user-1",
        "closed_at": "2026-11-28T10:00:01.250Z",
        "os": "Android",
        "app_version": "",
        "request_id": "r-1",
    }
    entries = [
        {**common, "type": "session.closed", "reason": "user_logout"},
        {
            **common,
            "type": "session.closed",
            "reason": "user_logout_all",
            "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        },
        {**common, "type": "session.expired", "reason": "expired", "expired_at": "1795860000.5"},
        # An entry a relay of the previous release left in the outbox: no type, no reason.
        common,
    ]
    return [SessionEvent.from_outbox(e).to_cloudevent("/eliab/session-service") for e in entries]


@pytest.mark.parametrize("event", relay_events(), ids=lambda e: e["data"]["reason"])
def test_every_event_the_relay_publishes_matches_the_published_json_schema(
    event: dict[str, Any],
) -> None:
    validator = Draft202012Validator(
        event_json_schema(), format_checker=Draft202012Validator.FORMAT_CHECKER
    )
    assert list(validator.iter_errors(json.loads(json.dumps(event)))) == []


def test_the_published_schema_is_the_producers_strict_one() -> None:
    validator = Draft202012Validator(event_json_schema())
    [event] = relay_events()[:1]
    assert not validator.is_valid({**event, "unknown": 1})
    assert not validator.is_valid({**event, "type": "session.renamed"})
    assert not validator.is_valid({**event, "data": {**event["data"], "sessionId": ""}})


def test_the_documents_examples_match_the_schema() -> None:
    validator = Draft202012Validator(event_json_schema())
    for message in build_document()["components"]["messages"].values():
        for example in message["examples"]:
            assert list(validator.iter_errors(example["payload"])) == [], message["name"]


@pytest.mark.parametrize(
    "traceparent",
    [
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    ],
)
def test_the_published_schema_refuses_a_traceparent_the_api_ignores(traceparent: str) -> None:
    validator = Draft202012Validator(event_json_schema())
    event = relay_events()[1]
    assert validator.is_valid(event)
    assert traceparent_of_request(traceparent) is None
    assert not validator.is_valid({**event, "traceparent": traceparent})
