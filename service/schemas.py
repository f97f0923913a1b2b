"""Marshmallow schemas for the close request and the info reply. The handler validates
with them and /openapi.json is generated from them, so the two cannot drift apart."""

from __future__ import annotations

from typing import Any

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate

from session_close.events import APP_VERSION_MAX, OS_MAX, SESSION_ID_RE

MAX_BODY_BYTES = 16 * 1024

# Semantic Versioning 2.0.0, the regular expression its specification gives ([0-9], not
# \d, which would admit non-ASCII digits).
SEMVER_RE = (
    r"^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)"
    r"(?:-((?:0|[1-9][0-9]*|[0-9]*[a-zA-Z-][0-9a-zA-Z-]*)"
    r"(?:\.(?:0|[1-9][0-9]*|[0-9]*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?\Z"
)
# RFC 7235 schemes are case-insensitive; the token is 1..512 visible ASCII characters.
AUTHORIZATION_RE = r"(?i:basic|bearer) [\x21-\x7e]{1,512}\Z"


def _printable(value: str) -> None:
    if not value.isprintable():
        raise ValidationError("Must contain printable characters only.")


class AuthorizationSchema(Schema):
    Authorization = fields.String(
        required=True,
        validate=validate.Regexp(
            AUTHORIZATION_RE, error="Must be 'Basic <token>' or 'Bearer <token>'."
        ),
        metadata={"description": "`Basic <access token>` (opaque, not user:pass) or `Bearer`."},
    )


_SESSION_ID = validate.Regexp(
    SESSION_ID_RE.pattern + r"\Z", error="Must be 8 to 256 characters of A-Z a-z 0-9 . _ -."
)


class CloseHeadersSchema(Schema):
    SessionID = fields.String(
        required=True,
        validate=_SESSION_ID,
        metadata={"description": "The session to close (header name in any case)."},
    )
    OS = fields.String(
        validate=[validate.Length(min=1, max=OS_MAX), _printable],
        metadata={"description": "Client operating system, e.g. Android."},
    )
    AppVersion = fields.String(
        validate=[
            validate.Length(max=APP_VERSION_MAX),
            validate.Regexp(SEMVER_RE, error="Must be a Semantic Versioning 2.0.0 version."),
        ],
        metadata={"description": "App version, full SemVer 2.0.0 (1.0.10, 2.0.0-rc.1+build.5)."},
    )


class CloseAllHeadersSchema(CloseHeadersSchema):
    """Log out everywhere: SessionID is optional, unless keepCurrent names it as the one
    session to keep."""

    SessionID = fields.String(
        validate=_SESSION_ID,
        metadata={"description": "The requesting session; required when keepCurrent is true."},
    )


class StrictBoolean(fields.Boolean):
    """JSON true or false only: marshmallow's Boolean also takes "yes", 1, "on"..."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bool:
        if not isinstance(value, bool):
            raise ValidationError("Not a valid boolean.")
        return value


class CloseAllContentSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    keepCurrent = StrictBoolean(
        load_default=False,
        metadata={"description": "Keep the requesting session (SessionID) open; default false."},
    )


class CloseAllBodySchema(Schema):
    class Meta:
        unknown = EXCLUDE

    requestContent = fields.Nested(CloseAllContentSchema, required=True)


class CloseBodySchema(Schema):
    class Meta:
        unknown = EXCLUDE

    requestContent = fields.Dict(
        required=True, metadata={"description": "Expected empty; keys inside are ignored."}
    )


class InfoSchema(Schema):
    type = fields.String(
        required=True, validate=validate.OneOf(["success", "warning", "error", "info"])
    )
    title = fields.String(required=True)
    message = fields.String(required=True)
    sessionId = fields.String(required=True)
    closedSessions = fields.Integer(
        metadata={"description": "Only on a close-all: how many sessions were closed now."}
    )
    errors = fields.Dict(
        keys=fields.String(),
        values=fields.List(fields.String()),
        metadata={"description": "Only on 400: field name -> messages."},
    )


class InfoReplySchema(Schema):
    info = fields.Nested(InfoSchema, required=True)


def session_id_or_empty(value: str | None) -> str:
    """The reply's sessionId: the request's SessionID when well formed, else ""."""
    return value if value is not None and SESSION_ID_RE.fullmatch(value) else ""


def header_values(headers: Any, schema: Schema) -> dict[str, str]:
    """The schema's headers present in the request (header names match in any case)."""
    return {name: headers[name] for name in schema.fields if name in headers}
