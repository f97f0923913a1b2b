"""The session.closed event: built from an outbox entry, sent as a CloudEvents 1.0
structured-mode JSON message, and read back (and validated) by the workers."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from marshmallow import Schema, fields, validate

EVENT_TYPE = "session.closed"
REASON = "user_logout"
CONTENT_TYPE = "application/cloudevents+json"


class MalformedEvent(ValueError):
    """A message that is not a valid session.closed CloudEvent; never worth a retry."""


class SessionClosedDataSchema(Schema):
    sessionId = fields.String(required=True, validate=validate.Length(min=1))
    userId = fields.String(required=True, validate=validate.Length(min=1))
    closedAt = fields.AwareDateTime(required=True, format="iso")
    reason = fields.String(required=True, validate=validate.Equal(REASON))
    os = fields.String(required=True, allow_none=True)
    appVersion = fields.String(required=True, allow_none=True)
    requestId = fields.String(required=True, allow_none=True)


class CloudEventSchema(Schema):
    specversion = fields.String(required=True, validate=validate.Equal("1.0"))
    id = fields.UUID(required=True)
    source = fields.String(required=True, validate=validate.Length(min=1))
    type = fields.String(required=True, validate=validate.Equal(EVENT_TYPE))
    time = fields.AwareDateTime(required=True, format="iso")
    subject = fields.String(required=True, validate=validate.Length(min=1))
    datacontenttype = fields.String(required=True, validate=validate.Equal("application/json"))
    data = fields.Nested(SessionClosedDataSchema, required=True)


_schema = CloudEventSchema()

# The usual, well-formed event is checked here without marshmallow's per-call cost (about
# 40 us, an eighth of a worker's CPU per message). This accepts only what the schema
# accepts (tests/test_validation_fast_path.py); anything else goes to the schema, which
# decides and words the error.
_EVENT_KEYS = frozenset(_schema.fields)
_DATA_KEYS = frozenset(SessionClosedDataSchema().fields)
_OPTIONAL_TEXT = ("os", "appVersion", "requestId")
_CANONICAL_UUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}\Z")


def _text(value: object) -> bool:
    return isinstance(value, str) and value != ""


def _aware_time(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        return datetime.fromisoformat(value).utcoffset() is not None
    except ValueError:
        return False


def _plain_event(raw: dict[str, Any]) -> bool:
    data = raw.get("data")
    return (
        raw.keys() == _EVENT_KEYS
        and isinstance(data, dict)
        and data.keys() == _DATA_KEYS
        and raw["specversion"] == "1.0"
        and raw["type"] == EVENT_TYPE
        and raw["datacontenttype"] == "application/json"
        and isinstance(raw["id"], str)
        and _CANONICAL_UUID.match(raw["id"]) is not None
        and _text(raw["source"])
        and _text(raw["subject"])
        and _aware_time(raw["time"])
        and _text(data["sessionId"])
        and _text(data["userId"])
        and _aware_time(data["closedAt"])
        and data["reason"] == REASON
        and all(data[k] is None or isinstance(data[k], str) for k in _OPTIONAL_TEXT)
    )


@dataclass(frozen=True, slots=True)
class SessionClosed:
    event_id: str
    session_id: str
    user_id: str
    closed_at: str  # RFC 3339, UTC
    os: str | None
    app_version: str | None
    request_id: str | None
    # W3C Trace Context of the HTTP request that closed the session, when it sent one;
    # carried as the CloudEvents distributed-tracing extension attribute.
    traceparent: str | None = None

    @classmethod
    def from_outbox(cls, entry: Mapping[str, str]) -> SessionClosed:
        """An outbox stream entry, as close_sessions.lua wrote it."""
        return cls(
            event_id=entry["event_id"],
            session_id=entry["session_id"],
            user_id=entry["user_id"],
            closed_at=entry["closed_at"],
            os=entry.get("os") or None,
            app_version=entry.get("app_version") or None,
            request_id=entry.get("request_id") or None,
            traceparent=entry.get("traceparent") or None,
        )

    def to_cloudevent(self, source: str) -> dict[str, Any]:
        event: dict[str, Any] = {
            "specversion": "1.0",
            "id": self.event_id,
            "source": source,
            "type": EVENT_TYPE,
            "time": self.closed_at,
            "subject": self.session_id,
            "datacontenttype": "application/json",
            "data": {
                "sessionId": self.session_id,
                "userId": self.user_id,
                "closedAt": self.closed_at,
                "reason": REASON,
                "os": self.os,
                "appVersion": self.app_version,
                "requestId": self.request_id,
            },
        }
        if self.traceparent is not None:
            event["traceparent"] = self.traceparent
        return event

    def encode(self, source: str) -> bytes:
        return orjson.dumps(self.to_cloudevent(source))

    @classmethod
    def decode(cls, body: bytes) -> SessionClosed:
        """Parse and validate a message body; raise MalformedEvent saying what is wrong."""
        try:
            raw = orjson.loads(body)
        except orjson.JSONDecodeError as exc:  # also invalid UTF-8, NaN, lone surrogates
            raise MalformedEvent(f"not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise MalformedEvent("not a JSON object")
        if not _plain_event(raw):
            errors = _schema.validate(raw)
            if errors:
                raise MalformedEvent(f"not a session.closed CloudEvent: {errors}")
        data = raw["data"]
        return cls(
            event_id=raw["id"],
            session_id=data["sessionId"],
            user_id=data["userId"],
            closed_at=data["closedAt"],
            os=data["os"],
            app_version=data["appVersion"],
            request_id=data["requestId"],
        )
