"""The session.closed event: built from an outbox entry, sent as a CloudEvents 1.0
structured-mode JSON message, and read back (and validated) by the workers.

One schema serves both sides. The producer's is strict; consumers read with it as
tolerant readers, as CloudEvents requires: unknown attributes (extensions such as
traceparent or dataschema) and unknown fields in data are excluded, and the optional
attributes (subject, time, and data's os, appVersion, requestId) may be missing. What no
consumer can store (a NUL character, a time PostgreSQL cannot hold) fails the schema
itself, so such an event is malformed, never a message retried until it poisons a batch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate

EVENT_TYPE = "session.closed"
REASON = "user_logout"
CONTENT_TYPE = "application/cloudevents+json"


class MalformedEvent(ValueError):
    """A message that is not a valid session.closed CloudEvent; never worth a retry."""


def _storable_text(value: str) -> None:
    # PostgreSQL text cannot hold NUL: such an event would fail every INSERT it is in.
    if "\x00" in value:
        raise ValidationError("Must not contain a NUL character.")


def _storable_time(value: datetime) -> None:
    # A time that is in range only before its offset is applied (0001-01-01T00:00+01:00)
    # cannot be sent to PostgreSQL.
    try:
        value.astimezone(UTC)
    except OverflowError:
        raise ValidationError("Outside the range of storable times.") from None


def _storable_id(*more: validate.Validator) -> list[Any]:
    return [validate.Length(min=1), _storable_text, *more]


class SessionClosedDataSchema(Schema):
    sessionId = fields.String(required=True, validate=_storable_id())
    userId = fields.String(required=True, validate=_storable_id())
    closedAt = fields.AwareDateTime(required=True, format="iso", validate=_storable_time)
    reason = fields.String(required=True, validate=validate.Equal(REASON))
    os = fields.String(required=True, allow_none=True, validate=_storable_text)
    appVersion = fields.String(required=True, allow_none=True, validate=_storable_text)
    requestId = fields.String(required=True, allow_none=True, validate=_storable_text)


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

# The consumers' reading of the same two schemas. marshmallow does not pass `unknown` or
# `partial` down to a nested schema, so data is read by its own reader.
_OPTIONAL_ATTRIBUTES = ("subject", "time")
_OPTIONAL_DATA = ("os", "appVersion", "requestId")
_envelope_reader = CloudEventSchema(unknown=EXCLUDE, partial=_OPTIONAL_ATTRIBUTES, exclude=["data"])
_data_reader = SessionClosedDataSchema(unknown=EXCLUDE, partial=_OPTIONAL_DATA)


def read_errors(raw: dict[str, Any]) -> dict[str, Any]:
    """What makes `raw` unreadable as a session.closed event ({} when it is readable)."""
    errors: dict[str, Any] = _envelope_reader.validate(raw)
    data = raw.get("data")
    data_errors: dict[str, Any] | list[str]
    if isinstance(data, dict):
        data_errors = _data_reader.validate(data)
    else:
        data_errors = ["Missing data for required field." if data is None else "Not an object."]
    if data_errors:
        errors["data"] = data_errors
    return errors


# W3C Trace Context: version-traceid-parentid-flags; version ff and all-zero ids are
# invalid, and a later version may append fields.
_TRACEPARENT = re.compile(
    r"(?!ff)([0-9a-f]{2})-(?!0{32})([0-9a-f]{32})-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}(-.*)?\Z"
)


def _traceparent(value: object) -> str | None:
    """The value if it is a valid traceparent, else None: a bad one is ignored."""
    if not isinstance(value, str):
        return None
    match = _TRACEPARENT.match(value)
    if match is None or (match[1] == "00" and match[3] is not None):
        return None
    return value


# The usual, well-formed event is checked here without marshmallow's per-call cost (about
# 40 us, an eighth of a worker's CPU per message). This accepts only what the schema
# accepts (tests/test_validation_fast_path.py); anything else goes to the schema, which
# decides and words the error.
_EVENT_KEYS = frozenset(_schema.fields)
_TRACED_EVENT_KEYS = _EVENT_KEYS | {"traceparent"}
_DATA_KEYS = frozenset(SessionClosedDataSchema().fields)
_CANONICAL_UUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}\Z")


def _text(value: object) -> bool:
    return isinstance(value, str) and value != ""


def _storable(value: object) -> bool:
    return value is None or (isinstance(value, str) and "\x00" not in value)


def _aware_time(value: object, *, storable: bool = False) -> bool:
    if not isinstance(value, str):
        return False
    try:
        parsed = datetime.fromisoformat(value)
        if storable:
            parsed.astimezone(UTC)
    except (ValueError, OverflowError):
        return False
    return parsed.utcoffset() is not None


def _plain_event(raw: dict[str, Any]) -> bool:
    data = raw.get("data")
    return (
        (raw.keys() == _EVENT_KEYS or raw.keys() == _TRACED_EVENT_KEYS)
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
        and _aware_time(data["closedAt"], storable=True)
        and data["reason"] == REASON
        and all(_storable(data[k]) for k in ("sessionId", "userId", *_OPTIONAL_DATA))
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

    @property
    def trace_id(self) -> str | None:
        """The trace-id part of traceparent, for log lines."""
        return None if self.traceparent is None else self.traceparent[3:35]

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
            errors = read_errors(raw)
            if errors:
                raise MalformedEvent(f"not a session.closed CloudEvent: {errors}")
        data = raw["data"]
        return cls(
            event_id=raw["id"],
            session_id=data["sessionId"],
            user_id=data["userId"],
            closed_at=data["closedAt"],
            os=data.get("os"),
            app_version=data.get("appVersion"),
            request_id=data.get("requestId"),
            traceparent=_traceparent(raw.get("traceparent")),
        )
