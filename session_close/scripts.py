"""Redis Lua scripts, each kept in its own file in lua/ beside this module and loaded once,
with lua/lib.lua (what they share) in front of it."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError


class LuaScript:
    """A script, run by its SHA1 (EVALSHA): loaded on first use, and again after a
    Redis restart or failover. `script_load` loads it on every primary of a cluster."""

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


async def run_each(
    redis: Redis, calls: Sequence[tuple[LuaScript, list[str], list[Any]]]
) -> list[Any]:
    """Several script runs in one pipeline (one round trip to each Redis node they go
    to: on Redis Cluster, each run goes to the node of its keys' slot). Each result is
    the run's reply, or the error reply it met; an unreachable node raises."""
    pipe = redis.pipeline(transaction=False)
    for script, keys, args in calls:
        # As a plain command: redis-py's cluster pipeline refuses its evalsha() method,
        # yet routes EVALSHA by its keys like any other command.
        pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
    results: list[Any] = await pipe.execute(raise_on_error=False)
    unknown = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
    if unknown:
        # A node restarted, or was added, since the scripts were loaded: load them on
        # every primary and run again only the runs that did not run.
        for script in {calls[i][0] for i in unknown}:
            await script.load(redis)
        pipe = redis.pipeline(transaction=False)
        for i in unknown:
            script, keys, args = calls[i]
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        for i, result in zip(unknown, await pipe.execute(raise_on_error=False), strict=True):
            results[i] = result
    return results


CLOSE_SESSIONS = LuaScript("close_sessions.lua")
CLOSE_ALL_SESSIONS = LuaScript("close_all_sessions.lua")
READ_OUTBOX = LuaScript("read_outbox.lua")
REMOVE_PUSH_TOKENS = LuaScript("remove_push_tokens.lua")
SETTLE_ENTRIES = LuaScript("settle_entries.lua")
SWEEP_EXPIRED = LuaScript("sweep_expired.lua")
TAKE_OVER_RELAYS = LuaScript("take_over_relays.lua")
USERS_OF_TOKENS = LuaScript("users_of_tokens.lua")
