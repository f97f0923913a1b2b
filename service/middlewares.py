"""Request id, and the info reply for every failure on every path."""

from __future__ import annotations

import logging
import re
import uuid

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler
from redis import exceptions as redis_errors

from service.appkeys import REQUEST_ID
from service.replies import Reply, info_reply

log = logging.getLogger(__name__)

_REQUEST_ID_RE = re.compile(r"[\x21-\x7e]{1,128}")

# Redis down, timing out or briefly unable to serve: worth a retry, so 503. Any other
# Redis error (a key of the wrong type, a script error) is a 500 like any other bug.
REDIS_UNAVAILABLE = (
    redis_errors.ConnectionError,  # BusyLoadingError included
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,
    redis_errors.TryAgainError,
    redis_errors.ClusterDownError,
    redis_errors.OutOfMemoryError,
    TimeoutError,
    ConnectionError,
)

_HTTP_REPLIES = {
    404: Reply.NOT_FOUND,
    405: Reply.METHOD_NOT_ALLOWED,
    413: Reply.TOO_LARGE,
}


def request_id_of(request: web.Request) -> str:
    """The client's X-Request-ID when it is sane (it reaches logs and events), else new."""
    sent = request.headers.get("X-Request-ID")
    if sent is not None and _REQUEST_ID_RE.fullmatch(sent):
        return sent
    return uuid.uuid4().hex


@web.middleware
async def info_replies(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = request[REQUEST_ID] = request_id_of(request)
    structlog.contextvars.bind_contextvars(request_id=request_id)
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        reply = _HTTP_REPLIES.get(exc.status, Reply.INTERNAL if exc.status >= 500 else None)
        if reply is None:
            raise
        keep = {k: v for k, v in exc.headers.items() if k in ("Allow", "WWW-Authenticate")}
        response = info_reply(request, reply, headers=keep)
    except REDIS_UNAVAILABLE as exc:
        log.warning("Redis unavailable: %r", exc)
        response = info_reply(request, Reply.UNAVAILABLE, headers={"Retry-After": "1"})
    except Exception:
        log.exception("unexpected error")
        response = info_reply(request, Reply.INTERNAL)
    finally:
        structlog.contextvars.unbind_contextvars("request_id")
    response.headers["X-Request-ID"] = request_id
    return response
