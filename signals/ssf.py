"""The SSF 1.0 endpoints of the transmitter: its metadata, its JWKS, stream configuration
(create, read, update, replace, delete), stream status, verification, and the RFC 8936
poll endpoint of each poll stream.

Receivers authenticate with the bearer token `sessionctl receiver add` printed (RFC 6749
bearer tokens, issued out of band); the transmitter keeps only its SHA-256. A receiver
sees only its own streams: another's stream id is answered as one that does not exist.
Errors carry SSF's status codes (400, 401, 404, 405, 413) and an RFC 8935 style body,
`{"err": ..., "description": ...}`; nothing a request sends is changed by one that
fails. A stream's Authorization header for push is never echoed back: a replace or
update that leaves it out keeps it.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate

from signals import sets
from signals.metrics import SignalsMetrics
from signals.sets import EVENTS_SUPPORTED, Signer
from signals.store import POLL, PUSH, Store, Stream
from signals.urls import ForbiddenUrl, check_url

MAX_BODY_BYTES = 64 * 1024
MAX_EVENTS = 100  # per poll
LONG_POLL_SECONDS = 10.0  # a poll without returnImmediately waits this long for a SET
LONG_POLL_STEP_SECONDS = 0.25
STATUSES = ("enabled", "paused", "disabled")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class SsfError(Exception):
    def __init__(self, status: int, err: str, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.err = err
        self.description = description


def _json(body: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def error_response(status: int, err: str, description: str) -> web.Response:
    response = _json({"err": err, "description": description}, status)
    response.headers["Content-Language"] = "en"
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="ssf"'
    return response


@web.middleware
async def ssf_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every refusal in the one format, aiohttp's own (404, 405, 413) included."""
    try:
        return await handler(request)
    except SsfError as exc:
        return error_response(exc.status, exc.err, exc.description)
    except web.HTTPRequestEntityTooLarge:
        return error_response(413, "invalid_request", f"body over {MAX_BODY_BYTES} bytes")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, "invalid_request", exc.reason)


class _Strict(Schema):
    class Meta:
        # A receiver may send back what the transmitter supplied (iss, aud, ...): ignored.
        unknown = EXCLUDE


class DeliverySchema(_Strict):
    method = fields.String(required=True, validate=validate.OneOf([PUSH, POLL]))
    endpoint_url = fields.String(validate=validate.Length(max=2048), allow_none=True)
    authorization_header = fields.String(validate=validate.Length(max=4096), allow_none=True)


class StreamSchema(_Strict):
    stream_id = fields.String()
    delivery = fields.Nested(DeliverySchema)
    events_requested = fields.List(
        fields.String(validate=validate.Length(max=256)), validate=validate.Length(max=32)
    )
    description = fields.String(validate=validate.Length(max=1024), allow_none=True)


class StatusSchema(_Strict):
    stream_id = fields.String(required=True)
    status = fields.String(required=True, validate=validate.OneOf(STATUSES))
    reason = fields.String(validate=validate.Length(max=1024), allow_none=True)


class VerifySchema(_Strict):
    stream_id = fields.String(required=True)
    state = fields.String(validate=validate.Length(max=1024), allow_none=True)


class SetErrorSchema(_Strict):
    err = fields.String(required=True, validate=validate.Length(max=256))
    description = fields.String(validate=validate.Length(max=1024), load_default="")


class PollSchema(_Strict):
    maxEvents = fields.Integer(validate=validate.Range(min=0, max=MAX_EVENTS), load_default=10)
    returnImmediately = fields.Boolean(load_default=False)
    ack = fields.List(fields.String(), validate=validate.Length(max=1000), load_default=list)
    setErrs = fields.Dict(
        keys=fields.String(),
        values=fields.Nested(SetErrorSchema),
        load_default=dict,
    )


_STREAM = StreamSchema()
_STATUS = StatusSchema()
_VERIFY = VerifySchema()
_POLL = PollSchema()


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _uuid(text: object) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(text))
    except ValueError:
        return None


def _jtis(values: list[str]) -> list[str]:
    # A jti this transmitter never issued is simply not found.
    return [str(parsed) for value in values if (parsed := _uuid(value)) is not None]


class SsfApi:
    def __init__(
        self,
        store: Store,
        signer: Signer,
        metrics: SignalsMetrics,
        *,
        issuer: str,
        allow_http: bool,
    ) -> None:
        self._store = store
        self._signer = signer
        self._metrics = metrics
        self._issuer = issuer.rstrip("/")
        self._allow_http = allow_http

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/.well-known/ssf-configuration", self.configuration)
        app.router.add_get("/jwks.json", self.jwks)
        app.router.add_post("/ssf/streams", self.create_stream)
        app.router.add_get("/ssf/streams", self.read_streams)
        app.router.add_patch("/ssf/streams", self.update_stream)
        app.router.add_put("/ssf/streams", self.replace_stream)
        app.router.add_delete("/ssf/streams", self.delete_stream)
        app.router.add_get("/ssf/status", self.read_status)
        app.router.add_post("/ssf/status", self.update_status)
        app.router.add_post("/ssf/verify", self.verify)
        app.router.add_post("/ssf/poll/{stream_id}", self.poll)

    # Public metadata.

    async def configuration(self, request: web.Request) -> web.Response:
        return _json(
            {
                "spec_version": "1_0",
                "issuer": self._issuer,
                "jwks_uri": f"{self._issuer}/jwks.json",
                "delivery_methods_supported": [PUSH, POLL],
                "configuration_endpoint": f"{self._issuer}/ssf/streams",
                "status_endpoint": f"{self._issuer}/ssf/status",
                "verification_endpoint": f"{self._issuer}/ssf/verify",
                "authorization_schemes": [{"spec_urn": "urn:ietf:rfc:6749"}],
                "default_subjects": "ALL",
            }
        )

    async def jwks(self, request: web.Request) -> web.Response:
        return _json(self._signer.jwks())

    # Streams.

    async def create_stream(self, request: web.Request) -> web.Response:
        receiver = await self._receiver(request)
        body = await self._body(request, _STREAM)
        method, url, authorization = await self._delivery(body.get("delivery"), None)
        stream = await self._store.create_stream(
            receiver,
            delivery_method=method,
            endpoint_url=url,
            authorization_header=authorization,
            events_requested=body.get("events_requested", []),
            description=body.get("description"),
        )
        return _json(self._config(stream), 201)

    async def read_streams(self, request: web.Request) -> web.Response:
        receiver = await self._receiver(request)
        if "stream_id" in request.query:
            return _json(self._config(await self._stream(receiver, request.query["stream_id"])))
        return _json([self._config(stream) for stream in await self._store.streams(receiver)])

    async def update_stream(self, request: web.Request) -> web.Response:
        """PATCH: the members given change, the others stay."""
        return await self._write_stream(request, replace=False)

    async def replace_stream(self, request: web.Request) -> web.Response:
        """PUT: receiver-supplied members left out are removed (a delivery left out
        stays: it is not the receiver's alone)."""
        return await self._write_stream(request, replace=True)

    async def _write_stream(self, request: web.Request, *, replace: bool) -> web.Response:
        receiver = await self._receiver(request)
        body = await self._body(request, _STREAM)
        current = await self._stream(receiver, body.get("stream_id"))
        method, url, authorization = await self._delivery(body.get("delivery"), current)
        if replace:
            events = body.get("events_requested", [])
            description = body.get("description")
        else:
            events = body.get("events_requested", current.events_requested)
            description = body.get("description", current.description)
        stream = await self._store.update_stream(
            receiver,
            current.id,
            delivery_method=method,
            endpoint_url=url,
            authorization_header=authorization,
            events_requested=events,
            description=description,
        )
        if stream is None:  # deleted meanwhile
            raise SsfError(404, "not_found", "no such stream")
        return _json(self._config(stream))

    async def delete_stream(self, request: web.Request) -> web.Response:
        receiver = await self._receiver(request)
        stream = await self._stream(receiver, request.query.get("stream_id"))
        await self._store.delete_stream(receiver, stream.id)
        return web.Response(status=204)

    # Status and verification.

    async def read_status(self, request: web.Request) -> web.Response:
        receiver = await self._receiver(request)
        return _json(self._status(await self._stream(receiver, request.query.get("stream_id"))))

    async def update_status(self, request: web.Request) -> web.Response:
        receiver = await self._receiver(request)
        body = await self._body(request, _STATUS)
        current = await self._stream(receiver, body["stream_id"])
        stream = await self._store.set_status(
            receiver, current.id, body["status"], body.get("reason")
        )
        if stream is None:
            raise SsfError(404, "not_found", "no such stream")
        return _json(self._status(stream))

    async def verify(self, request: web.Request) -> web.Response:
        receiver = await self._receiver(request)
        body = await self._body(request, _VERIFY)
        stream = await self._stream(receiver, body["stream_id"])
        if stream.status == "disabled":
            raise SsfError(400, "invalid_request", "the stream is disabled")
        state = {"streamId": str(stream.id), "state": body.get("state")}
        await self._store.request_verification(stream.id, orjson.dumps(state).decode())
        return web.Response(status=204)

    # RFC 8936 poll.

    async def poll(self, request: web.Request) -> web.Response:
        receiver = await self._receiver(request)
        stream = await self._stream(receiver, request.match_info["stream_id"])
        if stream.delivery_method != POLL:
            raise SsfError(400, "invalid_request", "the stream is delivered by push, not poll")
        body = await self._body(request, _POLL)
        acks = _jtis(body["ack"])
        errors = [
            (str(jti), f"{value['err']}: {value['description']}".rstrip(": "))
            for key, value in body["setErrs"].items()
            if (jti := _uuid(key)) is not None
        ]
        wanted = body["maxEvents"] if stream.status == "enabled" else 0
        deadline = time.monotonic() + (0 if body["returnImmediately"] else LONG_POLL_SECONDS)
        while True:
            polled, more, acked_ages = await self._store.poll(
                stream.id, max_events=wanted, acks=acks, errors=errors
            )
            for age in acked_ages:
                self._metrics.attempted(stream.audience, "delivered", age)
            for _ in errors:
                self._metrics.attempted(stream.audience, "failed")
            acks, errors = [], []
            if polled or wanted == 0 or time.monotonic() >= deadline:
                break
            await asyncio.sleep(LONG_POLL_STEP_SECONDS)
        signed = {
            p.jti: self._signer.sign(
                sets.claims(
                    issuer=self._issuer,
                    audience=stream.audience,
                    jti=p.jti,
                    iat=int(p.created_at),
                    event_type=p.event_type,
                    body=p.body,
                )
            )
            for p in polled
        }
        return _json({"sets": signed, "moreAvailable": more})

    # Shared steps.

    async def _receiver(self, request: web.Request) -> uuid.UUID:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise SsfError(401, "authentication_failed", "a bearer token is required")
        receiver = await self._store.receiver_of_token(token_hash(token.strip()))
        if receiver is None:
            raise SsfError(401, "authentication_failed", "the token is unknown or revoked")
        return receiver

    @staticmethod
    async def _body(request: web.Request, schema: Schema) -> dict[str, Any]:
        raw = await request.read()  # over client_max_size: 413
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise SsfError(400, "invalid_request", "the body is not JSON") from None
        if not isinstance(parsed, dict):
            raise SsfError(400, "invalid_request", "the body is not a JSON object")
        try:
            return schema.load(parsed)  # type: ignore[no-any-return]
        except ValidationError as exc:
            raise SsfError(400, "invalid_request", f"invalid members: {exc.messages}") from None

    async def _stream(self, receiver: uuid.UUID, stream_id: object) -> Stream:
        if stream_id is None:
            raise SsfError(400, "invalid_request", "stream_id is required")
        parsed = _uuid(stream_id)
        stream = None if parsed is None else await self._store.stream(receiver, parsed)
        if stream is None:
            raise SsfError(404, "not_found", "no such stream")
        return stream

    async def _delivery(
        self, delivery: dict[str, Any] | None, current: Stream | None
    ) -> tuple[str, str | None, str | None]:
        """(method, endpoint_url, authorization_header) to store. No delivery given: the
        current one, or poll for a new stream (SSF's default)."""
        if delivery is None:
            if current is not None:
                return current.delivery_method, current.endpoint_url, current.authorization_header
            return POLL, None, None
        if delivery["method"] == POLL:
            # A receiver may send back the poll URL it was given; it cannot choose one.
            given = delivery.get("endpoint_url")
            if (given and (current is None or given != self._poll_url(current))) or delivery.get(
                "authorization_header"
            ):
                raise SsfError(
                    400, "invalid_request", "a poll stream's endpoint_url is the transmitter's"
                )
            return POLL, None, None
        url = delivery.get("endpoint_url")
        if not url:
            raise SsfError(400, "invalid_request", "push delivery needs an endpoint_url")
        try:
            await check_url(url, allow_http=self._allow_http)
        except ForbiddenUrl as exc:
            raise SsfError(400, "invalid_request", f"endpoint_url {exc}") from None
        authorization = delivery.get("authorization_header")
        if authorization is None and current is not None and current.endpoint_url == url:
            authorization = current.authorization_header
        return PUSH, url, authorization

    def _config(self, stream: Stream) -> dict[str, Any]:
        delivery: dict[str, Any] = {"method": stream.delivery_method}
        delivery["endpoint_url"] = (
            self._poll_url(stream) if stream.delivery_method == POLL else stream.endpoint_url
        )
        config: dict[str, Any] = {
            "stream_id": str(stream.id),
            "iss": self._issuer,
            "aud": stream.audience,
            "delivery": delivery,
            "events_supported": list(EVENTS_SUPPORTED),
            "events_requested": stream.events_requested,
            "events_delivered": [e for e in stream.events_requested if e in EVENTS_SUPPORTED],
        }
        if stream.description is not None:
            config["description"] = stream.description
        return config

    def _poll_url(self, stream: Stream) -> str:
        return f"{self._issuer}/ssf/poll/{stream.id}"

    @staticmethod
    def _status(stream: Stream) -> dict[str, Any]:
        status = {"stream_id": str(stream.id), "status": stream.status}
        if stream.status_reason:
            status["reason"] = stream.status_reason
        return status
