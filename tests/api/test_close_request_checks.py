"""POST /v1.0/session/close, rows 1 to 5 of the error table of docs/http-api.md (the
request itself: path and method, size, Content-Type, Authorization, headers and body), in
its order: each test also sends what would fail a later row, so it proves the row
answers first, and checks that the rejected request left the test's Redis keys exactly as
they were."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from service.schemas import MAX_BODY_BYTES
from session_close.keys import Keys
from tests.support.closing import (
    APP_CONTENT_TYPE,
    BODY,
    CLOSE_PATH,
    SID,
    TOKEN,
    Client,
    app_headers,
    info_of,
    state_unchanged,
)

# 1. unknown path / wrong method


async def test_unknown_path_is_404_with_info(client: Client, redis: Redis, keys: Keys) -> None:
    async with state_unchanged(redis, keys):
        resp = await client.post("/v1.0/session/open", headers=app_headers(TOKEN, SID), data=BODY)
        info = await info_of(resp, 404, "error")
    assert info["title"] == "Not found"


async def test_wrong_method_is_405_with_info_and_allow(
    client: Client, redis: Redis, keys: Keys, session: str
) -> None:
    async with state_unchanged(redis, keys):
        resp = await client.get(CLOSE_PATH, headers=app_headers(TOKEN, session))
        info = await info_of(resp, 405, "error")
        resp = await client.delete(CLOSE_PATH, headers=app_headers(TOKEN, session), data=BODY)
        await info_of(resp, 405, "error")
    assert "POST" in resp.headers["Allow"]
    assert info["sessionId"] == session


# 2. body over 16 KiB


def oversized_body() -> bytes:
    return b'{"requestContent": {}, "pad": "' + b"x" * MAX_BODY_BYTES + b'"}'


async def test_body_over_16_kib_is_413_before_content_type_and_authorization(
    client: Client, redis: Redis, keys: Keys, session: str
) -> None:
    async with state_unchanged(redis, keys):
        resp = await client.post(CLOSE_PATH, headers={"Sessionid": session}, data=oversized_body())
        await info_of(resp, 413, "error")
        resp = await client.post(
            CLOSE_PATH, headers=app_headers(TOKEN, session), data=oversized_body()
        )
        info = await info_of(resp, 413, "error")
    assert info["sessionId"] == session


async def test_chunked_body_over_16_kib_is_413(
    client: Client, redis: Redis, keys: Keys, session: str
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        body = oversized_body()
        for start in range(0, len(body), 4096):
            yield body[start : start + 4096]

    async with state_unchanged(redis, keys):
        resp = await client.post(CLOSE_PATH, headers=app_headers(TOKEN, session), data=chunks())
        await info_of(resp, 413, "error")
    assert "Content-Length" not in resp.request_info.headers


async def test_body_of_exactly_16_kib_is_accepted(
    client: Client, redis: Redis, keys: Keys, session: str
) -> None:
    head, tail = b'{"requestContent": {}, "pad": "', b'"}'
    body = head + b"x" * (MAX_BODY_BYTES - len(head) - len(tail)) + tail
    assert len(body) == MAX_BODY_BYTES
    resp = await client.post(CLOSE_PATH, headers=app_headers(TOKEN, session), data=body)
    await info_of(resp, 200, "success")


# 3. Content-Type missing or not JSON


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "multipart/form-data", "application/jsonp", "application/json-patch"],
)
async def test_content_type_missing_or_not_json_is_415_before_authorization(
    client: Client, redis: Redis, keys: Keys, session: str, content_type: str | None
) -> None:
    headers = {"Sessionid": session}  # and no Authorization: 415 answers first
    if content_type is not None:
        headers["Content-Type"] = content_type
    async with state_unchanged(redis, keys):
        resp = await client.post(CLOSE_PATH, headers=headers, data=BODY)
        await info_of(resp, 415, "error")
        headers["Authorization"] = f"Basic {TOKEN}"
        resp = await client.post(CLOSE_PATH, headers=headers, data=BODY)
        await info_of(resp, 415, "error")


@pytest.mark.parametrize(
    "content_type", [APP_CONTENT_TYPE, "application/json", "Application/JSON; charset=utf-8"]
)
async def test_json_content_types_are_accepted(
    client: Client, session: str, content_type: str
) -> None:
    headers = app_headers(TOKEN, session, **{"Content-Type": content_type})
    resp = await client.post(CLOSE_PATH, headers=headers, data=BODY)
    await info_of(resp, 200, "success")


# 4. Authorization missing or malformed


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        TOKEN,
        "Basic",
        "Basic ",
        "Token abc",
        "Basic two words",
        "Basic tök",
        "Basic " + "a" * 513,
    ],
)
async def test_authorization_missing_or_malformed_is_401_with_www_authenticate(
    client: Client, redis: Redis, keys: Keys, session: str, authorization: str | None
) -> None:
    headers = app_headers(TOKEN, "bad sid!", AppVersion="v1")  # 400 material: 401 answers first
    del headers["Authorization"]
    if authorization is not None:
        headers["Authorization"] = authorization
    async with state_unchanged(redis, keys):
        resp = await client.post(CLOSE_PATH, headers=headers, data=b"[]")
        info = await info_of(resp, 401, "error")
    challenge = resp.headers["WWW-Authenticate"]
    assert "Basic" in challenge
    assert "Bearer" in challenge
    assert info["sessionId"] == ""


# 5. SessionID / OS / AppVersion / body invalid


@pytest.mark.parametrize(
    ("header", "value", "field"),
    [
        ("Sessionid", "short", "SessionID"),
        ("Sessionid", "has space here", "SessionID"),
        ("Sessionid", "semi;colon!", "SessionID"),
        ("Sessionid", "s" * 257, "SessionID"),
        ("OS", "", "OS"),
        ("OS", "x" * 65, "OS"),
        ("AppVersion", "1.0", "AppVersion"),
        ("AppVersion", "01.0.0", "AppVersion"),
        ("AppVersion", "v1.0.0", "AppVersion"),
        ("AppVersion", "1.0.0-", "AppVersion"),
        ("AppVersion", "1.0.0-01", "AppVersion"),
        ("AppVersion", "1.0.0+", "AppVersion"),
        ("AppVersion", "1.0.0.0", "AppVersion"),
    ],
)
async def test_invalid_header_is_400_with_errors_before_the_token_check(
    client: Client, redis: Redis, keys: Keys, session: str, header: str, value: str, field: str
) -> None:
    # An unknown token: the 400 must answer before the token is looked up.
    headers = app_headers("unknown-token", session, **{header: value})
    async with state_unchanged(redis, keys):
        resp = await client.post(CLOSE_PATH, headers=headers, data=BODY)
        info = await info_of(resp, 400, "error")
    assert list(info["errors"]) == [field]
    assert all(isinstance(m, str) for m in info["errors"][field])
    assert info["sessionId"] == (session if field != "SessionID" else "")


async def test_missing_session_id_is_400(
    client: Client, redis: Redis, keys: Keys, session: str
) -> None:
    headers = app_headers(TOKEN, session)
    del headers["Sessionid"]
    async with state_unchanged(redis, keys):
        resp = await client.post(CLOSE_PATH, headers=headers, data=BODY)
        info = await info_of(resp, 400, "error")
    assert list(info["errors"]) == ["SessionID"]
    assert info["sessionId"] == ""


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[]",
        b'"requestContent"',
        b"{}",
        b'{"requestContent": []}',
        b'{"requestContent": "x"}',
        b'{"requestContent": null}',
        b"\xff\xfe",
    ],
)
async def test_invalid_body_is_400_with_errors(
    client: Client, redis: Redis, keys: Keys, session: str, body: bytes
) -> None:
    async with state_unchanged(redis, keys):
        resp = await client.post(CLOSE_PATH, headers=app_headers(TOKEN, session), data=body)
        info = await info_of(resp, 400, "error")
    assert set(info["errors"]) <= {"body", "requestContent"}
    assert info["errors"]


async def test_every_invalid_field_is_reported_at_once(client: Client, session: str) -> None:
    headers = app_headers(TOKEN, "bad!", OS="", AppVersion="1.0")
    resp = await client.post(CLOSE_PATH, headers=headers, data=b"{}")
    info = await info_of(resp, 400, "error")
    assert set(info["errors"]) == {"SessionID", "OS", "AppVersion", "requestContent"}


@pytest.mark.parametrize(
    "body",
    [
        b'{"requestContent": {"ignored": [1, 2]}}',
        b'{"requestContent": {}, "other": "ignored"}',
    ],
)
async def test_keys_inside_request_content_and_other_keys_are_ignored(
    client: Client, session: str, body: bytes
) -> None:
    resp = await client.post(CLOSE_PATH, headers=app_headers(TOKEN, session), data=body)
    await info_of(resp, 200, "success")


@pytest.mark.parametrize("version", ["1.0.10", "2.0.0-rc.1+build.5", "0.0.0", "1.2.3-alpha-1"])
async def test_full_semver_app_versions_are_accepted(
    client: Client, session: str, version: str
) -> None:
    resp = await client.post(
        CLOSE_PATH, headers=app_headers(TOKEN, session, AppVersion=version), data=BODY
    )
    await info_of(resp, 200, "success")


async def test_os_and_app_version_are_optional(client: Client, session: str) -> None:
    headers = app_headers(TOKEN, session)
    del headers["OS"], headers["AppVersion"]
    resp = await client.post(CLOSE_PATH, headers=headers, data=BODY)
    await info_of(resp, 200, "success")
