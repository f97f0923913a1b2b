"""Every middleware of the API, in the order `setup_middlewares` puts them: the request
measured, its id and the info reply for every failure on every path, and the whole
request read before the handler runs."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from service.appkeys import METRICS, REQUEST_ID, REQUEST_STARTED, TRACE_IDS, TRACEPARENT
from service.replies import Reply, info_reply
from service.schemas import MAX_BODY_BYTES
from session_close import tracing
from session_close.events import REQUEST_ID_RE, traceparent_of_request
from session_close.redis_client import unavailable

log = logging.getLogger(__name__)


# nginx's code for "the client went away before the reply": not the server's fault.
CLIENT_CLOSED = 499

_HTTP_REPLIES = {
    404: Reply.NOT_FOUND,
    405: Reply.METHOD_NOT_ALLOWED,
    413: Reply.TOO_LARGE,
}


@web.middleware
async def measure_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    start = request[REQUEST_STARTED] = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = CLIENT_CLOSED
        raise
    finally:
        # The route template, never the raw path, so label values stay bounded.
        resource = request.match_info.route.resource
        request.app[METRICS].observe_request(
            resource.canonical if resource is not None else None,
            request.method,
            status,
            time.perf_counter() - start,
        )


def request_id_of(request: web.Request) -> str:
    """The client's X-Request-ID when it is sane (it reaches logs and events), else new."""
    sent = request.headers.get("X-Request-ID")
    if sent is not None and REQUEST_ID_RE.fullmatch(sent):
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
    except Exception as exc:
        if request.transport is None:
            # A failure after the client left is not the server's (a read of the body it
            # never sent, or a Redis reply nobody waits for any more).
            response = _client_gone(repr(exc))
        elif unavailable(exc):
            # Worth a retry, so 503. Any other Redis error (a key of the wrong type, a
            # script error) is a 500 like any other bug.
            log.warning("Redis unavailable", extra={"error": repr(exc)})
            response = info_reply(request, Reply.UNAVAILABLE, headers={"Retry-After": "1"})
        else:
            log.exception("unexpected error")
            response = info_reply(request, Reply.INTERNAL)
    else:
        if request.transport is None:
            response = _client_gone(None)
    finally:
        structlog.contextvars.unbind_contextvars("request_id")
    response.headers["X-Request-ID"] = request_id
    return response


def _client_gone(error: str | None) -> web.Response:
    log.info("client disconnected before its reply", extra={"error": error})
    return web.Response(status=CLIENT_CLOSED)


@web.middleware
async def whole_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Reads the body before the handler runs, so that HTTP_READ_TIMEOUT_SECONDS bounds
    headers and body together; the handler's own read then returns the bytes kept."""
    if request.body_exists and (request.content_length or 0) <= MAX_BODY_BYTES:
        await request.read()  # 413 past client_max_size, for a chunked body too
    # The server's GuardedRequestHandler stops its read clock here; aiohttp's own handler
    # (the tests' client) has no such clock.
    request_read = getattr(request.protocol, "request_read", None)
    if request_read is not None:
        request_read()
    return await handler(request)


# The routes a server span is made for: a close and a close-all, not probes or scrapes.
TRACED_PATHS = frozenset({"/v1.0/session/close", "/v1.0/session/close-all"})


@web.middleware
async def traced_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A server span per close and close-all, continuing the caller's traceparent (a
    malformed one starts a trace). Installed only when tracing is on."""
    resource = request.match_info.route.resource
    if resource is None or resource.canonical not in TRACED_PATHS:
        return await handler(request)
    with tracing.tracer(__name__).start_as_current_span(
        f"{request.method} {resource.canonical}",
        context=tracing.parent_context(traceparent_of_request(request.headers.get("traceparent"))),
        kind=tracing.SpanKind.SERVER,
        attributes={"http.request.method": request.method, "http.route": resource.canonical},
    ) as span:
        request[TRACEPARENT] = tracing.traceparent_of(span)
        request[TRACE_IDS] = tracing.ids_of(span)
        response = await handler(request)
        span.set_attribute("http.response.status_code", response.status)
        if response.status >= 500:
            span.set_status(tracing.StatusCode.ERROR)
        return response


def setup_middlewares(app: web.Application) -> None:
    # measure_requests comes first so it sees the reply info_replies made of any failure,
    # whole_requests last so that info_replies answers its failures too; the server span
    # (with tracing on) wraps them all.
    traced = [traced_requests] if tracing.ENABLED else []
    app.middlewares.extend([*traced, measure_requests, info_replies, whole_requests])
