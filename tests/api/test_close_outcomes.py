"""POST /v1.0/session/close, rows 6 to 9 of the error table of docs/http-api.md (the
token, the session, a repeat, the close itself), in its order; a rejected request leaves
the test's Redis keys exactly as they were."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from session_close.keys import Keys
from session_close.settings import Settings
from tests.support.closing import (
    BODY,
    CLOSE_PATH,
    SID,
    TOKEN,
    USER,
    Client,
    app_headers,
    info_of,
    open_session,
    state_unchanged,
)
from tests.support.waiting import wait_until

# 6. token unknown or expired


async def test_unknown_token_is_401_before_the_session_check(
    client: Client, redis: Redis, keys: Keys, session: str
) -> None:
    async with state_unchanged(redis, keys):
        for sid in (session, "no-such-session"):
            resp = await client.post(
                CLOSE_PATH, headers=app_headers("unknown-token", sid), data=BODY
            )
            info = await info_of(resp, 401, "error")
            assert info["sessionId"] == sid
    assert "WWW-Authenticate" in resp.headers


async def test_expired_token_is_401(client: Client, redis: Redis, keys: Keys, session: str) -> None:
    await redis.pexpire(keys.token(TOKEN), 1)
    await wait_until(
        lambda: _gone(redis, keys.token(TOKEN)), "the token to expire", within=5, step=0.005
    )
    async with state_unchanged(redis, keys):
        resp = await client.post(CLOSE_PATH, headers=app_headers(TOKEN, session), data=BODY)
        await info_of(resp, 401, "error")
    assert await redis.exists(keys.session(USER, session))


async def test_token_without_user_id_is_401(
    client: Client, redis: Redis, keys: Keys, session: str
) -> None:
    await redis.hset(keys.token("odd-token"), mapping={"scope": "x"})
    async with state_unchanged(redis, keys):
        resp = await client.post(CLOSE_PATH, headers=app_headers("odd-token", session), data=BODY)
        await info_of(resp, 401, "error")


async def _gone(redis: Redis, key: str) -> bool:
    return not await redis.exists(key)


# 7. session unknown, expired, or owned by another user


async def test_unknown_expired_and_foreign_sessions_are_indistinguishable_404s(
    client: Client, redis: Redis, keys: Keys, session: str
) -> None:
    await open_session(redis, keys, "user-2", "session-of-user-2", "token-of-user-2")
    await open_session(redis, keys, USER, "session-expiring", TOKEN)
    await redis.pexpire(keys.session(USER, "session-expiring"), 1)
    await wait_until(
        lambda: _gone(redis, keys.session(USER, "session-expiring")), "expiry", within=5, step=0.005
    )
    replies = []
    async with state_unchanged(redis, keys):
        for sid in ("session-unknown", "session-expiring", "session-of-user-2"):
            resp = await client.post(CLOSE_PATH, headers=app_headers(TOKEN, sid), data=BODY)
            info = await info_of(resp, 404, "error")
            assert info.pop("sessionId") == sid
            replies.append(info)
    assert replies[0] == replies[1] == replies[2]
    assert await redis.sismember(keys.user_sessions("user-2"), "session-of-user-2")


# 8. already closed by this service, same user, within the tombstone retention


async def test_closing_again_is_200_info(
    client: Client, redis: Redis, keys: Keys, settings: Settings, session: str
) -> None:
    resp = await client.post(CLOSE_PATH, headers=app_headers(TOKEN, session), data=BODY)
    await info_of(resp, 200, "success")
    ttl = await redis.ttl(keys.tombstone(USER, session))
    assert settings.tombstone_ttl_seconds - 5 <= ttl <= settings.tombstone_ttl_seconds
    async with state_unchanged(redis, keys):
        resp = await client.post(CLOSE_PATH, headers=app_headers(TOKEN, session), data=BODY)
        info = await info_of(resp, 200, "info")
    assert info["sessionId"] == session
    assert info["title"] == "Session already closed"


async def test_closing_again_after_the_tombstone_expired_is_404(
    client: Client, redis: Redis, keys: Keys, session: str
) -> None:
    resp = await client.post(CLOSE_PATH, headers=app_headers(TOKEN, session), data=BODY)
    await info_of(resp, 200, "success")
    await redis.pexpire(keys.tombstone(USER, session), 1)
    await wait_until(
        lambda: _gone(redis, keys.tombstone(USER, session)), "expiry", within=5, step=0.005
    )
    resp = await client.post(CLOSE_PATH, headers=app_headers(TOKEN, session), data=BODY)
    await info_of(resp, 404, "error")


# 9. open and owned by the token's user: closed now


@pytest.mark.parametrize("header_name", ["SessionID", "Sessionid", "sessionid", "SESSIONID"])
@pytest.mark.parametrize("scheme", ["Basic", "Bearer", "basic"])
async def test_open_session_is_closed_with_success(
    client: Client, redis: Redis, keys: Keys, settings: Settings, header_name: str, scheme: str
) -> None:
    await open_session(redis, keys, USER, SID, TOKEN, device_id="device-1")
    await redis.sadd(keys.user_sessions(USER), "session-other")
    headers = app_headers(TOKEN, SID, Authorization=f"{scheme} {TOKEN}")
    del headers["Sessionid"]
    headers[header_name] = SID
    resp = await client.post(CLOSE_PATH, headers=headers, data=BODY)
    info = await info_of(resp, 200, "success")
    assert info == {
        "type": "success",
        "title": "Session closed!",
        "message": "The session has been closed successfully!",
        "sessionId": SID,
    }
    assert not await redis.exists(keys.session(USER, SID))
    assert await redis.smembers(keys.user_sessions(USER)) == {"session-other"}
    assert await redis.hget(keys.tombstone(USER, SID), "user_id") == USER
    assert await redis.ttl(keys.tombstone(USER, SID)) > 0
    assert await redis.hgetall(keys.token(TOKEN)) == {"user_id": USER}  # the token lives on


async def test_longest_token_and_session_id_are_accepted(
    client: Client, redis: Redis, keys: Keys
) -> None:
    token, sid = "~" * 512, "s" * 256
    await open_session(redis, keys, USER, sid, token)
    resp = await client.post(CLOSE_PATH, headers=app_headers(token, sid), data=BODY)
    await info_of(resp, 200, "success")
