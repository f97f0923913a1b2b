"""HTTP handlers of the session endpoints, close and close-all (ops.py has the others)."""

from __future__ import annotations

import logging
import re
from typing import Any

import orjson
from aiohttp import web
from marshmallow import Schema

from service.appkeys import CLOSER, METRICS, REQUEST_ID, TRACEPARENT
from service.closer import CloseAllRequest, CloseOutcome, CloseRequest
from service.replies import Reply, info_reply
from service.schemas import (
    AUTHORIZATION_RE,
    MAX_BODY_BYTES,
    SEMVER_RE,
    AuthorizationSchema,
    CloseAllBodySchema,
    CloseAllHeadersSchema,
    CloseBodySchema,
    CloseHeadersSchema,
    header_values,
)
from session_close import tracing
from session_close.events import APP_VERSION_MAX, OS_MAX, SESSION_ID_RE, traceparent_of_request
from session_close.logs import short_id

log = logging.getLogger(__name__)

_authorization = AuthorizationSchema()
_headers = CloseHeadersSchema()
_body = CloseBodySchema()
_close_all_headers = CloseAllHeadersSchema()
_close_all_body = CloseAllBodySchema()

WWW_AUTHENTICATE = 'Basic realm="eliab", Bearer realm="eliab"'

OUTCOME_REPLIES = {
    CloseOutcome.CLOSED: Reply.CLOSED,
    CloseOutcome.ALREADY_CLOSED: Reply.ALREADY_CLOSED,
    CloseOutcome.SESSION_NOT_FOUND: Reply.SESSION_NOT_FOUND,
    CloseOutcome.UNKNOWN_TOKEN: Reply.UNKNOWN_TOKEN,
}


def is_json(content_type: str | None) -> bool:
    # The apps send "application/json; multipart/form-data;": any ;-part may say JSON.
    return any(
        part.strip().lower() == "application/json" for part in (content_type or "").split(";")
    )


def _errors(schema: Schema, data: object) -> dict[str, list[str]]:
    errors: dict[str, list[str]] = schema.validate(data)  # type: ignore[arg-type]
    return errors


def _body_errors(body: bytes, schema: Schema = _body) -> dict[str, list[str]]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:  # also invalid UTF-8, NaN, nesting past 1024 levels
        return {"body": ["Must be a JSON object."]}
    if not isinstance(data, dict):
        return {"body": ["Must be a JSON object."]}
    return _flat(_errors(schema, data))


def _flat(errors: dict[str, Any], parent: str = "") -> dict[str, list[str]]:
    """marshmallow's nested errors as field path -> messages (`requestContent.keepCurrent`);
    a nested schema's own error (`_schema`) goes to the field that holds it."""
    flat: dict[str, list[str]] = {}
    for name, messages in errors.items():
        path = parent if name == "_schema" else f"{parent}.{name}" if parent else name
        if isinstance(messages, dict):
            flat |= _flat(messages, path)
        else:
            flat[path] = (
                [str(m) for m in messages] if isinstance(messages, list) else [str(messages)]
            )
    return flat


# The usual, well-formed request is checked here with the schemas' own patterns, without
# marshmallow's per-call cost (about 20 us of a close's CPU). These accept only what the
# schemas accept; anything else goes to the schemas, which decide and word the errors.
_AUTHORIZATION = re.compile(AUTHORIZATION_RE)
_SESSION_ID = re.compile(SESSION_ID_RE.pattern + r"\Z")
_SEMVER = re.compile(SEMVER_RE)


def _plain_authorization(value: str | None) -> bool:
    return value is not None and _AUTHORIZATION.match(value) is not None


def _plain_request(headers: dict[str, str], body: bytes) -> bool:
    sid, os_name, version = headers.get("SessionID"), headers.get("OS"), headers.get("AppVersion")
    if sid is None or _SESSION_ID.match(sid) is None:
        return False
    if os_name is not None and not (1 <= len(os_name) <= OS_MAX and os_name.isprintable()):
        return False
    if version is not None and (len(version) > APP_VERSION_MAX or _SEMVER.match(version) is None):
        return False
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(data, dict) and isinstance(data.get("requestContent"), dict)


async def _authorized_request(
    request: web.Request, headers_schema: Schema
) -> tuple[str, dict[str, str], bytes] | web.Response:
    """Checks 2 to 4 of the error table, in its order: the reply of the first that fails,
    or the token, the schema's headers and the body."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        return info_reply(request, Reply.TOO_LARGE)
    body = await request.read()  # raises 413 past client_max_size (chunked bodies)

    if not is_json(request.headers.get("Content-Type")):
        return info_reply(request, Reply.UNSUPPORTED_MEDIA_TYPE)

    if not _plain_authorization(request.headers.get("Authorization")) and _errors(
        _authorization, header_values(request.headers, _authorization)
    ):
        return info_reply(
            request, Reply.UNAUTHORIZED, headers={"WWW-Authenticate": WWW_AUTHENTICATE}
        )
    token = request.headers["Authorization"].split(" ", 1)[1]
    return token, header_values(request.headers, headers_schema), body


def _challenge(reply: Reply) -> dict[str, str] | None:
    # RFC 9110: every 401 carries the challenge, an unknown token's included.
    return {"WWW-Authenticate": WWW_AUTHENTICATE} if reply.status == 401 else None


def _event_traceparent(request: web.Request) -> str | None:
    """The event's traceparent: the close's server span with tracing on, else the
    request's own header (None when it sent none or a malformed one)."""
    if tracing.ENABLED:  # (request.get alone costs about 0.3 us: Mapping.get's KeyError)
        return request[TRACEPARENT]
    return traceparent_of_request(request.headers.get("traceparent"))


async def close_session(request: web.Request) -> web.Response:
    """Checks run in the order of the error table; the first that fails answers."""
    checked = await _authorized_request(request, _headers)
    if isinstance(checked, web.Response):
        return checked
    token, headers, body = checked
    if not _plain_request(headers, body):
        errors = _errors(_headers, headers) | _body_errors(body)
        if errors:
            return info_reply(request, Reply.INVALID, errors=errors)

    sid = headers["SessionID"]
    outcome = await request.app[CLOSER].close(
        CloseRequest.new(
            token,
            sid,
            headers.get("OS"),
            headers.get("AppVersion"),
            request[REQUEST_ID],
            _event_traceparent(request),
        )
    )
    request.app[METRICS].close_outcome(outcome)
    log.debug("close answered", extra={"session_id": short_id(sid), "outcome": outcome.value})
    reply = OUTCOME_REPLIES[outcome]
    return info_reply(request, reply, headers=_challenge(reply))


async def close_all_sessions(request: web.Request) -> web.Response:
    """Log out everywhere: the same checks as a close, then every open session of the
    token's user is closed, in bounded atomic steps (but the requesting one, if kept)."""
    checked = await _authorized_request(request, _close_all_headers)
    if isinstance(checked, web.Response):
        return checked
    token, headers, body = checked
    errors = _errors(_close_all_headers, headers) | _body_errors(body, _close_all_body)
    keep_current = False
    if not errors:
        keep_current = orjson.loads(body)["requestContent"].get("keepCurrent") is True
        if keep_current and "SessionID" not in headers:
            errors = {"SessionID": ["Required when keepCurrent is true."]}
    if errors:
        return info_reply(request, Reply.INVALID, errors=errors)

    result = await request.app[CLOSER].close_all(
        CloseAllRequest(
            token,
            headers["SessionID"] if keep_current else None,
            request[REQUEST_ID],
            _event_traceparent(request),
        )
    )
    request.app[METRICS].close_all_outcome(result)
    if result.outcome is CloseOutcome.CLOSED:
        reply = Reply.SESSIONS_CLOSED if result.closed else Reply.NO_SESSIONS_TO_CLOSE
        return info_reply(request, reply, closed_sessions=result.closed)
    reply = OUTCOME_REPLIES[result.outcome]
    return info_reply(request, reply, headers=_challenge(reply))
