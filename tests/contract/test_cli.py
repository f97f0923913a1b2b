"""sessionctl writes tokens, sessions and push tokens in exactly the Redis form of
docs/redis.md, the form the close endpoint reads."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from session_close.keys import Keys, bucket_of
from session_close.settings import Settings
from tests.support.closing import BODY, CLOSE_PATH, Client, app_headers, snapshot
from tests.support.processes import settings_env


async def sessionctl(settings: Settings, *args: str, **env: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "session_close.cli",
        *args,
        env=settings_env(settings, **env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def run_json(settings: Settings, *args: str) -> Any:
    code, out, err = await sessionctl(settings, *args)
    assert code == 0, err
    return json.loads(out)


async def test_token_is_stored_by_its_sha256_with_the_user_and_a_ttl(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    printed = await run_json(
        settings, "token", "--user", "u1", "--token", "tok-123", "--ttl", "120"
    )
    assert printed == {"userId": "u1", "token": "tok-123"}
    key = f"{keys.prefix}auth:token:{hashlib.sha256(b'tok-123').hexdigest()}"
    assert await snapshot(redis, keys.prefix) == {key: ("hash", {"user_id": "u1"})}
    assert 0 < await redis.ttl(key) <= 120


async def test_a_generated_token_is_printed_and_never_stored_in_clear(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    printed = await run_json(settings, "token", "--user", "u1")
    token = printed["token"]
    assert len(token) >= 32
    state = await snapshot(redis, keys.prefix)
    assert list(state) == [keys.token(token)]
    assert token not in json.dumps(state)


async def test_session_with_push_token_writes_the_session_its_user_set_and_push_map(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    before = int(time.time())
    printed = await run_json(
        settings,
        "session",
        "--user",
        "u1",
        "--session",
        "sid-00000001",
        "--ttl",
        "300",
        "--os",
        "Android",
        "--app-version",
        "1.0.10",
        "--device",
        "device-9",
        "--push-token",
        "fcm-token-1",
    )
    assert printed == {"userId": "u1", "sessionId": "sid-00000001"}
    state = await snapshot(redis, keys.prefix)
    # Layout 2 (docs/redis.md), spelled out: the tag of u1's bucket, CRC32("u1") mod 256.
    tag = f"{keys.prefix}{{b118}}:"
    session = state.pop(f"{tag}session:sid-00000001")
    assert state == {
        f"{tag}user:u1:sessions": ("set", ["sid-00000001"]),
        f"{tag}user:u1:push": ("hash", {"fcm-token-1": "sid-00000001"}),
        f"{tag}sessions:expiry": ("zset", "zset"),
    }
    kind, fields = session
    assert kind == "hash"
    assert before <= int(fields.pop("created_at")) <= int(time.time())
    expires_at = float(fields.pop("expires_at"))
    assert before + 300 <= expires_at <= time.time() + 300
    assert fields == {
        "user_id": "u1",
        "os": "Android",
        "app_version": "1.0.10",
        "device_id": "device-9",
    }
    # The expiry index has the session at its logical end, and its data outlives that
    # end by the grace period, so that the sweeper can still read it.
    assert await redis.zscore(keys.expiry(bucket_of("u1")), "sid-00000001") == expires_at
    grace = settings.session_expiry_grace_seconds
    assert 300 + grace - 5 < await redis.ttl(keys.session("u1", "sid-00000001")) <= 300 + grace


async def test_a_session_written_the_old_way_has_no_expiry_and_dies_with_its_ttl(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    await run_json(
        settings,
        "session",
        "--user",
        "u1",
        "--session",
        "sid-old-0001",
        "--ttl",
        "300",
        "--no-expiry-index",
    )
    assert "expires_at" not in await redis.hgetall(keys.session("u1", "sid-old-0001"))
    assert not await redis.exists(keys.expiry(bucket_of("u1")))
    assert 0 < await redis.ttl(keys.session("u1", "sid-old-0001")) <= 300


async def test_a_minimal_session_has_only_its_user_and_its_times(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    printed = await run_json(settings, "session", "--user", "u2")
    sid = printed["sessionId"]
    assert set(await redis.hgetall(keys.session("u2", sid))) == {
        "user_id",
        "created_at",
        "expires_at",
    }
    assert await redis.smembers(keys.user_sessions("u2")) == {sid}
    assert not await redis.exists(keys.user_push("u2"))


async def test_sessions_lists_a_users_open_sessions_without_push_tokens(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    for sid, push in (("sid-00000002", "push-b"), ("sid-00000001", "push-a")):
        await run_json(settings, "session", "--user", "u1", "--session", sid, "--push-token", push)
    await run_json(settings, "session", "--user", "u9", "--session", "sid-00000009")
    code, out, err = await sessionctl(settings, "sessions", "--user", "u1")
    assert code == 0, err
    assert json.loads(out) == {
        "userId": "u1",
        "sessions": ["sid-00000001", "sid-00000002"],
        "pushTokensBySession": {"sid-00000001": 1, "sid-00000002": 1},
    }
    assert "push-a" not in out


async def test_what_sessionctl_writes_the_close_endpoint_closes(
    client: Client, settings: Settings, redis: Redis, keys: Keys
) -> None:
    token = (await run_json(settings, "token", "--user", "u1"))["token"]
    sid = (await run_json(settings, "session", "--user", "u1", "--push-token", "p1"))["sessionId"]
    resp = await client.post(CLOSE_PATH, headers=app_headers(token, sid), data=BODY)
    assert resp.status == 200
    assert (await resp.json())["info"]["type"] == "success"
    listing = await run_json(settings, "sessions", "--user", "u1")
    assert listing["sessions"] == []


async def test_bad_configuration_is_named_and_help_works(settings: Settings) -> None:
    code, _, err = await sessionctl(settings, "sessions", "--user", "u1", REDIS_URL="nope")
    assert code != 0
    assert "REDIS_URL" in err
    code, out, _ = await sessionctl(settings, "--help")
    assert code == 0
    assert "REDIS_KEY_PREFIX" in out


def test_the_sessionctl_console_script_is_installed() -> None:
    assert (Path(sys.executable).parent / "sessionctl").exists()


async def test_a_session_the_api_would_refuse_is_refused_and_nothing_is_written(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    for bad in (
        ["--session", "eco-s1"],  # shorter than the API's 8
        ["--session", "a" * 257],
        ["--session", "has space"],
        ["--os", "x" * 65],
        ["--app-version", "1.0\n"],
    ):
        code, out, err = await sessionctl(settings, "session", "--user", "u1", *bad)
        assert code == 2, bad
        assert out == ""
        assert bad[0] in err
    assert await snapshot(redis, keys.prefix) == {}
    written = await run_json(settings, "session", "--user", "u1", "--session", "eco-s1-longer")
    assert written["sessionId"] == "eco-s1-longer"
