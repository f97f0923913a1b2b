"""The transmitter as an SSF receiver uses it: its metadata and JWKS, stream management,
push and poll delivery of CAEP session-revoked SETs, verification, pause and resume.
Every SET is verified the way a receiver would: PyJWT's PyJWKClient against the served
JWKS (the transmitter signs with joserfc)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web

from session_close.events import EXPIRED, SessionEvent
from session_close.settings import Settings
from tests.signals.conftest import SetReceiver, Transmitter, sessionctl, ssf_receiver
from tests.support.waiting import wait_until
from tests.support.workers import Broker, make_event

SESSION_REVOKED = "https://schemas.openid.net/secevent/caep/event-type/session-revoked"
VERIFICATION = "https://schemas.openid.net/secevent/ssf/event-type/verification"
PUSH = "urn:ietf:rfc:8935"
POLL = "urn:ietf:rfc:8936"

StartSetReceiver = Callable[..., Awaitable[SetReceiver]]


def expired_event(n: int) -> SessionEvent:
    event = make_event(n)
    return dataclasses.replace(event, type=EXPIRED, reason="expired", expired_at=event.closed_at)


class Client:
    """An SSF receiver's calls to the transmitter, with its bearer token."""

    def __init__(self, session: aiohttp.ClientSession, base: str, token: str | None) -> None:
        self.session = session
        self.base = base
        self.token = token

    async def call(
        self, method: str, path: str, body: Any = None, *, raw: bytes | None = None
    ) -> tuple[int, Any]:
        headers = {} if self.token is None else {"Authorization": f"Bearer {self.token}"}
        data = raw if raw is not None else None if body is None else aiohttp.JsonPayload(body)
        async with self.session.request(
            method, self.base + path, data=data, headers=headers
        ) as answer:
            text = await answer.text()
            return answer.status, (await answer.json() if text else None)

    async def create(self, **config: Any) -> dict[str, Any]:
        status, stream = await self.call("POST", "/ssf/streams", config)
        assert status == 201, stream
        return dict(stream)

    async def poll(self, stream: dict[str, Any], **request: Any) -> dict[str, Any]:
        assert stream["delivery"]["endpoint_url"] == f"{self.base}/ssf/poll/{stream['stream_id']}"
        status, answer = await self.call(
            "POST", f"/ssf/poll/{stream['stream_id']}", {"returnImmediately": True, **request}
        )
        assert status == 200, answer
        return dict(answer)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def verified(
    token: str, transmitter: Transmitter, audience: str, issuer: str | None = None
) -> dict[str, Any]:
    """A SET checked as a receiver checks it: signature by the key its kid names in the
    transmitter's JWKS, issuer (the transmitter's own URL unless given), audience; the
    header's typ."""
    jwks = jwt.PyJWKClient(f"{transmitter.url}/jwks.json", cache_keys=False)
    assert jwt.get_unverified_header(token)["typ"] == "secevent+jwt"
    try:
        key = jwks.get_signing_key_from_jwt(token)
        claims: dict[str, Any] = jwt.decode(
            token,
            key.key,
            algorithms=["RS256"],
            audience=audience,
            issuer=issuer or transmitter.url,
            options={"require": ["iss", "aud", "iat", "jti"]},
        )
    except jwt.PyJWTError as exc:
        raise AssertionError(f"the SET does not verify: {exc!r}") from exc
    assert "sub" not in claims
    assert "exp" not in claims
    return claims


async def test_the_metadata_names_every_endpoint_and_the_jwks_serves_both_keys(
    settings: Settings, transmitters: list[Transmitter], http: aiohttp.ClientSession
) -> None:
    transmitter = await Transmitter.start(settings)
    transmitters.append(transmitter)
    async with http.get(f"{transmitter.url}/.well-known/ssf-configuration") as answer:
        assert answer.status == 200
        metadata = await answer.json()
    base = transmitter.url
    assert metadata == {
        "spec_version": "1_0",
        "issuer": base,
        "jwks_uri": f"{base}/jwks.json",
        "delivery_methods_supported": [PUSH, POLL],
        "configuration_endpoint": f"{base}/ssf/streams",
        "status_endpoint": f"{base}/ssf/status",
        "verification_endpoint": f"{base}/ssf/verify",
        "authorization_schemes": [{"spec_urn": "urn:ietf:rfc:6749"}],
        "default_subjects": "ALL",
    }
    keys = await asyncio.to_thread(
        jwt.PyJWKClient(metadata["jwks_uri"], cache_keys=False).get_signing_keys
    )
    assert len(keys) == 2  # the signing key and the previous one (a rotation)
    assert all(k.key_type == "RSA" and k.public_key_use == "sig" for k in keys)
    assert len({k.key_id for k in keys}) == 2


async def test_a_push_stream_gets_every_session_end_as_a_session_revoked_set(
    settings: Settings,
    transmitters: list[Transmitter],
    signals_queue: Broker,
    set_receivers: StartSetReceiver,
    http: aiohttp.ClientSession,
) -> None:
    transmitter = await Transmitter.start(settings)
    transmitters.append(transmitter)
    _, token = await ssf_receiver(settings, "gateway")
    endpoint = await set_receivers()
    client = Client(http, transmitter.url, token)
    stream = await client.create(
        delivery={
            "method": PUSH,
            "endpoint_url": endpoint.url,
            "authorization_header": "Bearer receivers-own",
        },
        events_requested=[SESSION_REVOKED],
        description="the gateway's token cache",
    )
    assert stream["aud"] == "gateway"
    assert stream["iss"] == transmitter.url
    assert stream["events_delivered"] == [SESSION_REVOKED]
    assert "authorization_header" not in stream["delivery"]  # a secret: never echoed

    closed, expired = make_event(1), expired_event(2)
    await signals_queue.publish(closed, expired)
    await wait_until(lambda: len(endpoint.accepted()) == 2, "both SETs pushed")
    by_session: dict[str, dict[str, Any]] = {}
    for pushed in endpoint.pushed:
        assert pushed.headers["Content-Type"] == "application/secevent+jwt"
        assert pushed.headers["Authorization"] == "Bearer receivers-own"
        claims = await asyncio.to_thread(verified, pushed.token, transmitter, "gateway")
        by_session[claims["sub_id"]["session"]["id"]] = claims
    for event, entity in ((closed, "user"), (expired, "policy")):
        claims = by_session[event.session_id]
        assert claims["sub_id"] == {
            "format": "complex",
            "user": {"format": "opaque", "id": event.user_id},
            "session": {"format": "opaque", "id": event.session_id},
        }
        assert claims["txn"] == event.request_id
        ended = event.expired_at if event.expired_at else event.closed_at
        assert claims["events"] == {
            SESSION_REVOKED: {
                "event_timestamp": int(datetime.fromisoformat(ended).timestamp()),
                "initiating_entity": entity,
                "reason_admin": {"en": event.reason},
            }
        }
    assert len({claims["jti"] for claims in by_session.values()}) == 2


async def test_a_receiver_manages_only_its_own_streams(
    settings: Settings, transmitters: list[Transmitter], http: aiohttp.ClientSession
) -> None:
    transmitter = await Transmitter.start(settings)
    transmitters.append(transmitter)
    _, token = await ssf_receiver(settings, "partner-a")
    _, other_token = await ssf_receiver(settings, "partner-b")
    owner = Client(http, transmitter.url, token)
    other = Client(http, transmitter.url, other_token)

    stream = await owner.create(events_requested=[SESSION_REVOKED])  # no delivery: poll
    sid = stream["stream_id"]
    assert stream["delivery"] == {
        "method": POLL,
        "endpoint_url": f"{transmitter.url}/ssf/poll/{sid}",
    }
    assert await owner.call("GET", f"/ssf/streams?stream_id={sid}") == (200, stream)
    assert await owner.call("GET", "/ssf/streams") == (200, [stream])
    status, patched = await owner.call(
        "PATCH", "/ssf/streams", {"stream_id": sid, "description": "audit copy"}
    )
    assert status == 200
    assert patched == {**stream, "description": "audit copy"}
    status, replaced = await owner.call(
        "PUT", "/ssf/streams", {**patched, "events_requested": [SESSION_REVOKED, "urn:x"]}
    )
    assert status == 200
    assert replaced["events_requested"] == [SESSION_REVOKED, "urn:x"]
    assert replaced["events_delivered"] == [SESSION_REVOKED]
    assert "description" in replaced
    status, replaced = await owner.call(
        "PUT", "/ssf/streams", {"stream_id": sid, "events_requested": [SESSION_REVOKED]}
    )
    assert status == 200
    assert "description" not in replaced
    assert await owner.call("GET", f"/ssf/status?stream_id={sid}") == (
        200,
        {"stream_id": sid, "status": "enabled"},
    )

    # Another receiver sees none of it, and changes nothing.
    assert await other.call("GET", "/ssf/streams") == (200, [])
    for method, path, body in (
        ("GET", f"/ssf/streams?stream_id={sid}", None),
        ("PATCH", "/ssf/streams", {"stream_id": sid, "description": "mine now"}),
        ("PUT", "/ssf/streams", {"stream_id": sid, "events_requested": []}),
        ("DELETE", f"/ssf/streams?stream_id={sid}", None),
        ("GET", f"/ssf/status?stream_id={sid}", None),
        ("POST", "/ssf/status", {"stream_id": sid, "status": "disabled"}),
        ("POST", "/ssf/verify", {"stream_id": sid}),
        ("POST", f"/ssf/poll/{sid}", {"returnImmediately": True}),
    ):
        status, error = await other.call(method, path, body)
        assert status == 404, (method, path, error)
        assert error["err"] == "not_found"
    assert await owner.call("GET", f"/ssf/streams?stream_id={sid}") == (200, replaced)

    assert await owner.call("DELETE", f"/ssf/streams?stream_id={sid}") == (204, None)
    assert (await owner.call("GET", f"/ssf/streams?stream_id={sid}"))[0] == 404


async def test_verification_poll_with_ack_and_a_paused_stream_keeping_its_events(
    settings: Settings,
    transmitters: list[Transmitter],
    signals_queue: Broker,
    http: aiohttp.ClientSession,
) -> None:
    transmitter = await Transmitter.start(settings)
    transmitters.append(transmitter)
    _, token = await ssf_receiver(settings, "saas-tool")
    client = Client(http, transmitter.url, token)
    stream = await client.create(delivery={"method": POLL}, events_requested=[SESSION_REVOKED])
    sid = stream["stream_id"]

    assert await client.call("POST", "/ssf/verify", {"stream_id": sid, "state": "VGhpcyBp"}) == (
        204,
        None,
    )
    polled = await client.poll(stream)
    [(jti, token_)] = polled["sets"].items()
    claims = await asyncio.to_thread(verified, token_, transmitter, "saas-tool")
    assert claims["jti"] == jti
    assert claims["sub_id"] == {"format": "opaque", "id": sid}
    assert claims["events"] == {VERIFICATION: {"state": "VGhpcyBp"}}
    assert (await client.poll(stream, ack=[jti], maxEvents=0))["sets"] == {}

    events = [make_event(n) for n in range(3)]
    await signals_queue.publish(*events)

    async def pending() -> int:
        return len((await client.poll(stream, maxEvents=10))["sets"])

    await wait_until(lambda: _eq(pending(), 3), "three SETs to poll")
    first = await client.poll(stream, maxEvents=2)
    assert len(first["sets"]) == 2
    assert first["moreAvailable"] is True
    again = await client.poll(stream, maxEvents=2)
    assert again == first  # not acknowledged: the same SETs, byte for byte
    second = await client.poll(stream, ack=list(first["sets"]), maxEvents=10)
    assert len(second["sets"]) == 1
    assert second["moreAvailable"] is False
    sessions = set()
    for token_ in [*first["sets"].values(), *second["sets"].values()]:
        claims = await asyncio.to_thread(verified, token_, transmitter, "saas-tool")
        sessions.add(claims["sub_id"]["session"]["id"])
    assert sessions == {e.session_id for e in events}
    assert (await client.poll(stream, ack=list(second["sets"])))["sets"] == {}

    # Paused: the events pending then and those that come meanwhile are kept, not handed
    # out; enabled again, all of them.
    before, meanwhile = make_event(10), make_event(11)
    await signals_queue.publish(before)
    await wait_until(lambda: _eq(pending(), 1), "an event pending before the pause")
    assert await client.call(
        "POST", "/ssf/status", {"stream_id": sid, "status": "paused", "reason": "deploy"}
    ) == (200, {"stream_id": sid, "status": "paused", "reason": "deploy"})
    await signals_queue.publish(meanwhile)
    await asyncio.sleep(2)  # the contract's bound for a new event: recorded by now
    assert (await client.poll(stream))["sets"] == {}
    await client.call("POST", "/ssf/status", {"stream_id": sid, "status": "enabled"})
    resumed = await client.poll(stream, maxEvents=10)
    sessions = set()
    for token_ in resumed["sets"].values():
        claims = await asyncio.to_thread(verified, token_, transmitter, "saas-tool")
        sessions.add(claims["sub_id"]["session"]["id"])
    assert sessions == {before.session_id, meanwhile.session_id}


async def _eq(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


@pytest.mark.timeout(150)  # the attempts back off 1, 2, 4, 8, 16, then up to 38 s
async def test_a_push_receiver_down_for_30_s_gets_every_event_with_a_jti_each(
    settings: Settings,
    transmitters: list[Transmitter],
    signals_queue: Broker,
    set_receivers: StartSetReceiver,
    http: aiohttp.ClientSession,
    report_counts: Callable[..., None],
) -> None:
    down_until = time.monotonic() + 30

    async def down_then_up(request: web.Request, attempt: int) -> web.StreamResponse:
        return web.Response(status=503 if time.monotonic() < down_until else 202)

    transmitter = await Transmitter.start(settings)
    transmitters.append(transmitter)
    _, token = await ssf_receiver(settings, "gateway")
    endpoint = await set_receivers(down_then_up)
    await Client(http, transmitter.url, token).create(
        delivery={"method": PUSH, "endpoint_url": endpoint.url},
        events_requested=[SESSION_REVOKED],
    )
    events = [make_event(n) for n in range(20)]
    await signals_queue.publish(*events)

    await wait_until(lambda: len(endpoint.accepted()) >= 20, "every SET accepted", within=90)
    claims = [
        await asyncio.to_thread(verified, p.token, transmitter, "gateway")
        for p in endpoint.accepted()
    ]
    report_counts(
        events=len(events),
        attempts=len(endpoint.pushed),
        accepted=len(claims),
        distinct_jtis=len({c["jti"] for c in claims}),
    )
    assert len({c["jti"] for c in claims}) == 20  # distinct jtis equal the events
    assert {c["sub_id"]["session"]["id"] for c in claims} == {e.session_id for e in events}
    # Every retry of one event carried its jti: the SETs refused are those accepted later.
    refused = {
        jwt.decode(p.token, options={"verify_signature": False})["jti"]
        for p in endpoint.pushed
        if p.status == 503
    }
    assert refused <= {c["jti"] for c in claims}


async def test_a_push_transmitter_killed_mid_delivery_resends_the_same_jti(
    settings: Settings,
    transmitters: list[Transmitter],
    signals_queue: Broker,
    set_receivers: StartSetReceiver,
    http: aiohttp.ClientSession,
) -> None:
    first_attempt = asyncio.Event()

    async def hold_the_first(request: web.Request, attempt: int) -> web.StreamResponse:
        if attempt == 1:
            first_attempt.set()
            await asyncio.sleep(30)
        return web.Response(status=202)

    first = await Transmitter.start(settings)
    transmitters.append(first)
    _, token = await ssf_receiver(settings, "gateway")
    endpoint = await set_receivers(hold_the_first)
    await Client(http, first.url, token).create(
        delivery={"method": PUSH, "endpoint_url": endpoint.url},
        events_requested=[SESSION_REVOKED],
    )
    await signals_queue.publish(make_event(1))
    await asyncio.wait_for(first_attempt.wait(), 15)
    first.kill()
    transmitters.append(await Transmitter.start(settings, issuer=first.url))

    await wait_until(lambda: len(endpoint.pushed) == 2, "the SET pushed again", within=20)
    assert endpoint.pushed[0].token == endpoint.pushed[1].token  # same jti, same bytes


async def test_hostile_requests_get_a_clear_4xx_and_change_nothing(
    settings: Settings,
    transmitters: list[Transmitter],
    http: aiohttp.ClientSession,
) -> None:
    # As in production: https receivers at public addresses only.
    strict = dataclasses.replace(settings, signals_allow_http=False)
    transmitter = await Transmitter.start(strict, issuer="https://signals.example")
    transmitters.append(transmitter)
    receiver_id, token = await ssf_receiver(strict, "partner")
    client = Client(http, transmitter.url, token)
    stream = await client.create(events_requested=[SESSION_REVOKED])
    sid = stream["stream_id"]
    foreign = "8a6e0804-2bd0-4672-b79d-d97027f9071a"

    cases: list[tuple[str, str, Any, bytes | None, int]] = [
        ("POST", "/ssf/streams", None, b"{not json", 400),
        ("POST", "/ssf/streams", None, b"[1, 2]", 400),
        ("POST", "/ssf/streams", None, b'{"description": "' + b"x" * 70_000 + b'"}', 413),
        ("POST", "/ssf/streams", {"delivery": {"method": "urn:example:smtp"}}, None, 400),
        ("POST", "/ssf/streams", {"delivery": {"method": PUSH}}, None, 400),
        (
            "POST",
            "/ssf/streams",
            {"delivery": {"method": PUSH, "endpoint_url": "http://93.184.215.14/events"}},
            None,
            400,
        ),
        (
            "POST",
            "/ssf/streams",
            {"delivery": {"method": PUSH, "endpoint_url": "https://127.0.0.1/events"}},
            None,
            400,
        ),
        (
            "POST",
            "/ssf/streams",
            {"delivery": {"method": PUSH, "endpoint_url": "https://169.254.169.254/latest"}},
            None,
            400,
        ),
        (
            "POST",
            "/ssf/streams",
            {"delivery": {"method": POLL, "endpoint_url": "https://93.184.215.14/x"}},
            None,
            400,
        ),
        ("PATCH", "/ssf/streams", {"stream_id": foreign, "description": "x"}, None, 404),
        ("PATCH", "/ssf/streams", {"stream_id": "not-a-uuid"}, None, 404),
        ("PATCH", "/ssf/streams", {"description": "no stream id"}, None, 400),
        ("DELETE", f"/ssf/streams?stream_id={foreign}", None, None, 404),
        ("POST", "/ssf/status", {"stream_id": sid, "status": "asleep"}, None, 400),
        ("POST", "/ssf/verify", {"stream_id": foreign}, None, 404),
        ("POST", "/ssf/verify", None, b"\xff\xfe", 400),
        ("POST", f"/ssf/poll/{sid}", {"maxEvents": -1}, None, 400),
        ("POST", f"/ssf/poll/{sid}", {"ack": "not a list"}, None, 400),
        ("GET", "/ssf/nothing-here", None, None, 404),
        ("TRACE", "/ssf/streams", None, None, 405),
    ]
    for method, path, body, raw, expected in cases:
        status, error = await client.call(method, path, body, raw=raw)
        assert status == expected, (method, path, body, raw and raw[:40], error)
        assert set(error) == {"err", "description"}, error
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {token}"}):
        async with http.get(f"{transmitter.url}/ssf/streams", headers=headers) as answer:
            assert answer.status == 401
            assert answer.headers["WWW-Authenticate"].startswith("Bearer")
            assert (await answer.json())["err"] == "authentication_failed"

    # Nothing any of it sent changed the stream, or made one.
    assert await client.call("GET", "/ssf/streams") == (200, [stream])

    code, _, err = await sessionctl(strict, "receiver", "revoke", "--id", receiver_id)
    assert code == 0, err
    assert (await client.call("GET", "/ssf/streams"))[0] == 401
    assert token not in str(transmitter.lines)


async def test_receiver_names_are_unique_and_revoking_an_unknown_one_says_so(
    settings: Settings, signals_schema: str
) -> None:
    await ssf_receiver(settings, "gateway")
    code, printed, err = await sessionctl(settings, "receiver", "add", "--name", "gateway")
    assert code == 1
    assert printed == {}
    assert "exists" in err
    code, _, err = await sessionctl(settings, "receiver", "add", "--name", " padded ")
    assert code == 1
    assert "--name" in err
    code, _, err = await sessionctl(
        settings, "receiver", "revoke", "--id", "8a6e0804-2bd0-4672-b79d-d97027f9071a"
    )
    assert code == 1
    assert "no receiver" in err


async def test_after_a_key_rotation_old_and_new_sets_verify_by_their_kid(
    settings: Settings,
    transmitters: list[Transmitter],
    signals_queue: Broker,
    http: aiohttp.ClientSession,
) -> None:
    first = await Transmitter.start(settings)
    transmitters.append(first)
    _, token = await ssf_receiver(settings, "gateway")
    client = Client(http, first.url, token)
    stream = await client.create(events_requested=[SESSION_REVOKED])
    await signals_queue.publish(make_event(1))
    await wait_until(lambda: _eq(_count(client, stream), 1), "the first SET to poll")
    [(jti, before)] = (await client.poll(stream))["sets"].items()
    await client.poll(stream, ack=[jti], maxEvents=0)  # the receiver has it

    # The rotation: the new key listed first, the previous one kept after it.
    new, old = settings.signals_signing_key_files.split(",")
    first.kill()
    rotated = await Transmitter.start(
        dataclasses.replace(settings, signals_signing_key_files=f"{old},{new}")
    )
    transmitters.append(rotated)
    client = Client(http, rotated.url, token)
    stream = (await client.call("GET", f"/ssf/streams?stream_id={stream['stream_id']}"))[1]
    await signals_queue.publish(make_event(2))
    await wait_until(lambda: _eq(_count(client, stream), 1), "the second SET to poll")
    [after] = (await client.poll(stream))["sets"].values()
    assert jwt.get_unverified_header(before)["kid"] != jwt.get_unverified_header(after)["kid"]
    # Both verify against the JWKS served now: the old SET by the previous key.
    await asyncio.to_thread(verified, before, rotated, "gateway", first.url)
    await asyncio.to_thread(verified, after, rotated, "gateway")


async def _count(client: Client, stream: dict[str, Any]) -> int:
    return len((await client.poll(stream, maxEvents=10))["sets"])
