"""HTTP handlers: the close endpoint and the operational endpoints."""

from __future__ import annotations

import logging
import re

import orjson
from aiohttp import web
from marshmallow import Schema

from service.appkeys import CLOSER, METRICS, REQUEST_ID
from service.closer import CloseOutcome, CloseRequest
from service.replies import Reply, info_reply
from service.schemas import (
    AUTHORIZATION_RE,
    MAX_BODY_BYTES,
    SEMVER_RE,
    SESSION_ID_RE,
    AuthorizationSchema,
    CloseBodySchema,
    CloseHeadersSchema,
    header_values,
)
from session_close.logs import short_id

log = logging.getLogger(__name__)

_authorization = AuthorizationSchema()
_headers = CloseHeadersSchema()
_body = CloseBodySchema()

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


def _body_errors(body: bytes) -> dict[str, list[str]]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:  # also invalid UTF-8, NaN, nesting past 1024 levels
        return {"body": ["Must be a JSON object."]}
    if not isinstance(data, dict):
        return {"body": ["Must be a JSON object."]}
    return {
        name: msgs if isinstance(msgs, list) else [str(msgs)]
        for name, msgs in _errors(_body, data).items()
    }


# The usual, well-formed request is checked here with the schemas' own patterns, without
# marshmallow's per-call cost (about 20 us of a close's CPU). These accept only what the
# schemas accept; anything else goes to the schemas, which decide and word the errors.
_AUTHORIZATION = re.compile(AUTHORIZATION_RE)
_SESSION_ID = re.compile(SESSION_ID_RE.pattern + r"\Z")
_SEMVER = re.compile(SEMVER_RE)
# W3C Trace Context, version 00: lower-case hex, and neither id may be all zeros.
_TRACEPARENT = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}\Z")


def _plain_authorization(value: str | None) -> bool:
    return value is not None and _AUTHORIZATION.match(value) is not None


def traceparent(value: str | None) -> str | None:
    """The header when well formed; a malformed one is ignored, as W3C Trace Context
    asks, rather than failing the close."""
    return value if value is not None and _TRACEPARENT.match(value) else None


def _plain_request(headers: dict[str, str], body: bytes) -> bool:
    sid, os_name, version = headers.get("SessionID"), headers.get("OS"), headers.get("AppVersion")
    if sid is None or _SESSION_ID.match(sid) is None:
        return False
    if os_name is not None and not (1 <= len(os_name) <= 64 and os_name.isprintable()):
        return False
    if version is not None and (len(version) > 256 or _SEMVER.match(version) is None):
        return False
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(data, dict) and isinstance(data.get("requestContent"), dict)


async def close_session(request: web.Request) -> web.Response:
    """Checks run in the order of SPEC section 1; the first that fails answers."""
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

    headers = header_values(request.headers, _headers)
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
            traceparent(request.headers.get("traceparent")),
        )
    )
    request.app[METRICS].close_outcome(outcome)
    log.debug("close %s: %s", short_id(sid), outcome.value)
    reply = OUTCOME_REPLIES[outcome]
    # RFC 9110: every 401 carries the challenge, an unknown token's included.
    challenge = {"WWW-Authenticate": WWW_AUTHENTICATE} if reply.status == 401 else None
    return info_reply(request, reply, headers=challenge)
