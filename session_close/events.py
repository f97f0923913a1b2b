"""The session events, `session.closed` and `session.expired`: built from an outbox
entry, sent as CloudEvents 1.0 structured-mode JSON messages (the type is also the
routing key), and read back (and validated) by the workers.

One schema serves both sides. The producer's is strict; consumers read with it as
tolerant readers, as CloudEvents requires: unknown attributes (extensions such as
traceparent or dataschema) and unknown fields in data are excluded, and the optional
attributes (subject, time, and data's os, appVersion, requestId) may be missing. What no
consumer can store (a NUL character, a time PostgreSQL cannot hold), an id that is not a
canonical UUID, and a value longer than the API itself would ever put there fail the
schema itself, so such an event is malformed, never a message retried until it poisons a
batch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate, validates_schema

CLOSED = "session.closed"
EXPIRED = "session.expired"
# Each event type, the reasons it comes with: a close, a close-all, the sweeper.
REASONS = {CLOSED: ("user_logout", "user_logout_all"), EXPIRED: ("expired",)}
EVENT_TYPES = tuple(REASONS)
CONTENT_TYPE = "application/cloudevents+json"

# The API's bounds on what a client sends that an event carries (docs/http-api.md): the
# API validates its requests with them, and a consumer takes a longer value for a
# malformed event, since the API would never have put it there.
SESSION_ID_MAX = 256
SESSION_ID_RE = re.compile(rf"[A-Za-z0-9._-]{{8,{SESSION_ID_MAX}}}")
OS_MAX = 64
APP_VERSION_MAX = 256
REQUEST_ID_MAX = 128
REQUEST_ID_RE = re.compile(rf"[\x21-\x7e]{{1,{REQUEST_ID_MAX}}}")
# An event id as this service writes it: lower-case 8-4-4-4-12 hex (36 characters, which
# also keeps out the newline `$` lets through). Braces, `urn:uuid:` or upper case would
# name the same UUID to PostgreSQL but not to a reader comparing ids.
CANONICAL_UUID = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"


# W3C Trace Context: version-traceid-parentid-flags, in lower-case hex; neither id may be
# all zeros. The one rule: this service writes version 00 (TRACEPARENT); a consumer also
# reads later versions, which may append fields.
_TRACE_IDS = r"-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}"
TRACEPARENT = "00" + _TRACE_IDS
_TRACEPARENT = re.compile(TRACEPARENT + r"\Z")
_ANY_TRACEPARENT = re.compile(r"(?!ff)([0-9a-f]{2})" + _TRACE_IDS + r"(-.*)?\Z")


class MalformedEvent(ValueError):
    """A message that is not a valid session event; never worth a retry."""


class BadEntry(ValueError):
    """An outbox entry that cannot become a valid event: `field` says which of its fields
    (as the scripts name them), `reason` why. It never will, so it is set aside."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


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


def _storable_up_to(most: int) -> list[Any]:
    return [validate.Length(max=most), _storable_text]


class SessionEventDataSchema(Schema):
    # Only the API's upper bound: an expired session's id comes from the login side's
    # index, not through the API's check, and still deserves its cleanup.
    sessionId = fields.String(
        required=True, validate=_storable_id(validate.Length(max=SESSION_ID_MAX))
    )
    userId = fields.String(required=True, validate=_storable_id())
    closedAt = fields.AwareDateTime(required=True, format="iso", validate=_storable_time)
    reason = fields.String(
        required=True, validate=validate.OneOf([r for rs in REASONS.values() for r in rs])
    )
    expiredAt = fields.AwareDateTime(
        format="iso",
        validate=_storable_time,
        metadata={"description": "session.expired only: the session's expires_at."},
    )
    os = fields.String(required=True, allow_none=True, validate=_storable_up_to(OS_MAX))
    appVersion = fields.String(
        required=True, allow_none=True, validate=_storable_up_to(APP_VERSION_MAX)
    )
    requestId = fields.String(
        required=True, allow_none=True, validate=_storable_up_to(REQUEST_ID_MAX)
    )


class CloudEventSchema(Schema):
    specversion = fields.String(required=True, validate=validate.Equal("1.0"))
    id = fields.String(
        required=True,
        validate=[
            validate.Length(equal=36),
            validate.Regexp(CANONICAL_UUID, error="Must be a lower-case UUID, 8-4-4-4-12."),
        ],
        metadata={"format": "uuid"},
    )
    source = fields.String(required=True, validate=validate.Length(min=1))
    type = fields.String(required=True, validate=validate.OneOf(EVENT_TYPES))
    time = fields.AwareDateTime(required=True, format="iso")
    subject = fields.String(required=True, validate=validate.Length(min=1))
    datacontenttype = fields.String(required=True, validate=validate.Equal("application/json"))
    data = fields.Nested(SessionEventDataSchema, required=True)
    # The CloudEvents distributed-tracing extension, when the closing request had one.
    traceparent = fields.String(
        validate=validate.Regexp(f"^{TRACEPARENT}$"),
        metadata={"description": "W3C Trace Context of the request that closed the session."},
    )

    @validates_schema
    def reason_of_its_type(self, event: dict[str, Any], **_: Any) -> None:
        data = event.get("data")
        if data is None:  # invalid, or left to the consumers' data reader
            return
        if data.get("reason") not in REASONS.get(event.get("type", ""), ()):
            raise ValidationError(f"Must be one of {REASONS} by type.", "reason")
        if (event.get("type") == EXPIRED) != ("expiredAt" in data):
            raise ValidationError("Present in session.expired events only.", "expiredAt")


_schema = CloudEventSchema()

# The consumers' reading of the same two schemas. marshmallow does not pass `unknown` or
# `partial` down to a nested schema, so data is read by its own reader.
_OPTIONAL_ATTRIBUTES = ("subject", "time")
_OPTIONAL_DATA = ("os", "appVersion", "requestId")
# traceparent is read on its own too: a malformed one is ignored, never a dead letter.
_envelope_reader = CloudEventSchema(
    unknown=EXCLUDE, partial=_OPTIONAL_ATTRIBUTES, exclude=["data", "traceparent"]
)
_data_reader = SessionEventDataSchema(unknown=EXCLUDE, partial=_OPTIONAL_DATA)


def read_errors(raw: dict[str, Any]) -> dict[str, Any]:
    """What makes `raw` unreadable as a session event ({} when it is readable)."""
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


def _traceparent(value: object) -> str | None:
    """The value if it is a valid traceparent of any version, else None: a consumer
    ignores a bad one. A later version may append fields; version ff is invalid."""
    if not isinstance(value, str):
        return None
    match = _ANY_TRACEPARENT.match(value)
    if match is None or (match[1] == "00" and match[2] is not None):
        return None
    return value


def traceparent_of_request(value: str | None) -> str | None:
    """A request's traceparent header when it is one this service carries into the event
    (version 00), else None: a malformed header is ignored, as W3C Trace Context asks,
    rather than failing the close."""
    return value if value is not None and _TRACEPARENT.match(value) else None


# The usual, well-formed event is checked here without marshmallow's per-call cost (about
# 40 us, an eighth of a worker's CPU per message). This accepts only what the schema
# accepts (tests/api/test_validation_fast_path.py); anything else goes to the schema, which
# decides and words the error.
_TRACED_EVENT_KEYS = frozenset(_schema.fields)
_EVENT_KEYS = _TRACED_EVENT_KEYS - {"traceparent"}
_DATA_KEYS = {
    CLOSED: frozenset(SessionEventDataSchema().fields) - {"expiredAt"},
    EXPIRED: frozenset(SessionEventDataSchema().fields),
}
_CANONICAL_UUID = re.compile(CANONICAL_UUID)
# The data fields the API bounds, each with the most characters it may have.
_BOUNDS = {
    "sessionId": SESSION_ID_MAX,
    "os": OS_MAX,
    "appVersion": APP_VERSION_MAX,
    "requestId": REQUEST_ID_MAX,
}


def _text(value: object) -> bool:
    return isinstance(value, str) and value != ""


def _storable(value: object, most: int | None = None) -> bool:
    if value is None:
        return True
    return isinstance(value, str) and "\x00" not in value and (most is None or len(value) <= most)


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
    event_type = raw.get("type")
    return (
        (raw.keys() == _EVENT_KEYS or raw.keys() == _TRACED_EVENT_KEYS)
        and isinstance(event_type, str)
        and event_type in REASONS
        and isinstance(data, dict)
        and data.keys() == _DATA_KEYS[event_type]
        and raw["specversion"] == "1.0"
        and raw["datacontenttype"] == "application/json"
        and isinstance(raw["id"], str)
        and _CANONICAL_UUID.fullmatch(raw["id"]) is not None
        and _text(raw["source"])
        and _text(raw["subject"])
        and _aware_time(raw["time"])
        and _text(data["sessionId"])
        and _text(data["userId"])
        and _aware_time(data["closedAt"], storable=True)
        and data["reason"] in REASONS[event_type]
        and (event_type == CLOSED or _aware_time(data["expiredAt"], storable=True))
        and _storable(data["userId"])
        and all(_storable(data[k], most) for k, most in _BOUNDS.items())
    )


@dataclass(frozen=True, slots=True)
class SessionEvent:
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
    type: str = CLOSED
    reason: str = "user_logout"
    expired_at: str | None = None  # RFC 3339, UTC; session.expired only

    @property
    def trace_id(self) -> str | None:
        """The trace-id part of traceparent, for log lines."""
        return None if self.traceparent is None else self.traceparent[3:35]

    @classmethod
    def from_outbox(cls, entry: Mapping[str, str]) -> SessionEvent:
        """An outbox stream entry, as the close, close-all and sweeper scripts write it
        (entries written before there were several types have no type and reason).
        Raises BadEntry for an entry that cannot become a valid event."""
        missing = [f for f in _REQUIRED_ENTRY_FIELDS if f not in entry]
        if missing:
            raise BadEntry(missing[0], "missing")
        # A value that is no Unix time in range is treated as not given, which a
        # session.expired event cannot do without.
        given = entry.get("expired_at")
        expired_at = None if given is None else unix_time_rfc3339(given)
        event_type = entry.get("type", CLOSED)
        if given is not None and expired_at is None and event_type == EXPIRED:
            raise BadEntry("expired_at", "not a Unix time of the years 1 to 9999")
        event = cls(
            event_id=entry["event_id"],
            session_id=entry["session_id"],
            user_id=entry["user_id"],
            closed_at=entry["closed_at"],
            # The API bounds what a request sends, but a close-all, an expiry, or a close
            # without the header takes them from the login side's session hash: cut to
            # the bounds here, so that the consumers can act on the event.
            os=(entry.get("os") or "")[:OS_MAX] or None,
            app_version=(entry.get("app_version") or "")[:APP_VERSION_MAX] or None,
            request_id=entry.get("request_id") or None,
            traceparent=entry.get("traceparent") or None,
            type=event_type,
            reason=entry.get("reason", "user_logout"),
            expired_at=expired_at,
        )
        errors = _outbound_errors(event.to_cloudevent("relay"))
        if errors:
            field, reason = _first_error(errors)
            raise BadEntry(_ENTRY_FIELDS.get(field, field), reason)
        return event

    def to_cloudevent(self, source: str) -> dict[str, Any]:
        event: dict[str, Any] = {
            "specversion": "1.0",
            "id": self.event_id,
            "source": source,
            "type": self.type,
            "time": self.closed_at,
            "subject": self.session_id,
            "datacontenttype": "application/json",
            "data": {
                "sessionId": self.session_id,
                "userId": self.user_id,
                "closedAt": self.closed_at,
                "reason": self.reason,
                "os": self.os,
                "appVersion": self.app_version,
                "requestId": self.request_id,
            },
        }
        if self.expired_at is not None:
            event["data"]["expiredAt"] = self.expired_at
        if self.traceparent is not None:
            event["traceparent"] = self.traceparent
        return event

    def encode(self, source: str) -> bytes:
        return orjson.dumps(self.to_cloudevent(source))

    @classmethod
    def decode(cls, body: bytes) -> SessionEvent:
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
                raise MalformedEvent(f"not a session event: {errors}")
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
            type=raw["type"],
            reason=data["reason"],
            expired_at=data.get("expiredAt"),
        )


def rfc3339_now() -> str:
    """Now, as the events' times are written (the scripts store it as closedAt)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# A Unix time as the scripts and the login side write it: decimal digits, an optional
# fraction and exponent (no hex, no "nan", no "inf", no underscores, which float() takes).
_UNIX_TIME = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?\Z")
# The times every consumer can hold: years 1 to 9999 (Python's datetime; PostgreSQL's
# range is wider), in Unix seconds.
FIRST_UNIX_TIME = -62135596800.0  # 0001-01-01T00:00:00Z
END_UNIX_TIME = 253402300800.0  # 10000-01-01T00:00:00Z, excluded


def unix_time_rfc3339(value: str) -> str | None:
    """`value` (Unix seconds) as an RFC 3339 time, or None when it is not a finite Unix
    time of the years 1 to 9999."""
    if not _UNIX_TIME.match(value):
        return None
    unix = float(value)  # the pattern admits no nan; a huge exponent gives inf
    if not FIRST_UNIX_TIME <= unix < END_UNIX_TIME:
        return None
    try:
        stamp = datetime.fromtimestamp(unix, UTC)
    except (ValueError, OverflowError, OSError):  # rounding at the very ends
        return None
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# The entry's fields (the scripts' names) that every event needs, and the event's names
# for them back to the entry's, so that a dead letter names the field the entry holds.
_REQUIRED_ENTRY_FIELDS = ("event_id", "session_id", "user_id", "closed_at")
_ENTRY_FIELDS = {
    "id": "event_id",
    "type": "type",
    "time": "closed_at",
    "subject": "session_id",
    "sessionId": "session_id",
    "userId": "user_id",
    "closedAt": "closed_at",
    "reason": "reason",
    "expiredAt": "expired_at",
    "os": "os",
    "appVersion": "app_version",
    "requestId": "request_id",
}


# The producer's schema, less traceparent: a traceparent the strict pattern rejects (a
# later version) is carried as it came, for the consumers to read or ignore.
_outbound = CloudEventSchema(unknown=EXCLUDE, exclude=["traceparent"])


def _outbound_errors(raw: dict[str, Any]) -> dict[str, Any]:
    if _plain_event(raw):  # the usual event, without marshmallow's cost
        return {}
    errors: dict[str, Any] = _outbound.validate(raw)
    return errors


def _first_error(errors: dict[str, Any]) -> tuple[str, str]:
    """The first field and message of marshmallow's nested error dict."""
    field, messages = next(iter(errors.items()))
    if isinstance(messages, dict):
        return _first_error(messages)
    return field, str(messages[0] if isinstance(messages, list) and messages else messages)
