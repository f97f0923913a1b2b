"""Redis Lua scripts, each kept in its own file in lua/ beside this module and loaded once,
with lua/lib.lua (what they share) in front of it."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError


class LuaScript:
    def __init__(self, filename: str) -> None:
        self.name = filename.removesuffix(".lua")  # for spans
        folder = Path(__file__).parent / "lua"
        self.source = (folder / "lib.lua").read_text() + (folder / filename).read_text()
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()

    async def load(self, redis: Redis) -> None:
        await redis.script_load(self.source)

    async def __call__(self, redis: Redis, keys: list[str], args: list[Any]) -> Any:
        try:
            return await redis.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            # Redis restarted (it keeps no scripts across a restart): load and run again.
            await self.load(redis)
            return await redis.evalsha(self.sha, len(keys), *keys, *args)


CLOSE_SESSIONS = LuaScript("close_sessions.lua")
CLOSE_ALL_SESSIONS = LuaScript("close_all_sessions.lua")
REMOVE_PUSH_TOKENS = LuaScript("remove_push_tokens.lua")
SWEEP_EXPIRED = LuaScript("sweep_expired.lua")
TAKE_OVER_RELAYS = LuaScript("take_over_relays.lua")
