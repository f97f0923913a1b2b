"""The API tests' open session."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from session_close.keys import Keys
from tests.support.closing import SID, TOKEN, USER, open_session


@pytest.fixture
async def session(redis: Redis, keys: Keys) -> str:
    await open_session(redis, keys, USER, SID, TOKEN, os="iOS", app_version="1.0.0")
    return SID
