"""End to end: a close through the real API reaches both workers."""

from __future__ import annotations

from aiohttp import web
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from session_close.cli import create_session, create_token
from session_close.keys import Keys
from session_close.settings import Settings
from tests.support.waiting import wait_until
from tests.support.workers import (
    AuditTable,
    in_process,
    running,
    settled_count,
)
from workers.audit import open_audit
from workers.push_cleanup import open_push_cleanup


async def test_a_close_writes_its_audit_row_and_removes_its_push_token(
    client: TestClient[web.Request, web.Application],
    settings: Settings,
    redis: Redis,
    keys: Keys,
    audit_table: AuditTable,
) -> None:
    await create_token(redis, keys, "u7", "token-7", 60)
    await create_session(redis, keys, "u7", "session-old-7", ttl=60, push_token="push-A")
    await create_session(redis, keys, "u7", "session-new-7", ttl=60, push_token="push-B")
    audit = in_process(settings, "audit", open_audit)
    push = in_process(settings, "push-cleanup", open_push_cleanup)
    async with running(audit), running(push):
        resp = await client.post(
            "/v1.0/session/close",
            headers={
                "Content-Type": "application/json",
                "Sessionid": "session-old-7",
                "Authorization": "Basic token-7",
                "OS": "iOS",
                "AppVersion": "2.0.0-rc.1+build.5",
                "X-Request-ID": "req-pipeline-7",
            },
            json={"requestContent": {}},
        )
        assert resp.status == 200

        async def both_done() -> bool:
            return (
                settled_count(audit.metrics, "acked") == 1
                and settled_count(push.metrics, "acked") == 1
            )

        await wait_until(both_done, "both workers to handle the event")
    [event_id] = await audit_table.event_ids()
    row = await audit_table.row(event_id)
    assert (row["session_id"], row["user_id"], row["request_id"]) == (
        "session-old-7",
        "u7",
        "req-pipeline-7",
    )
    assert (row["os"], row["app_version"]) == ("iOS", "2.0.0-rc.1+build.5")
    assert await redis.hgetall(keys.user_push("u7")) == {"push-B": "session-new-7"}
