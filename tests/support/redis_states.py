"""A redis-server of the test's own (tests.support.processes.redis_server, started with
WRITABLE_DIR) put into the states where it refuses writes, and back: MISCONF (it cannot
write its snapshot) and OOM (full, with noeviction)."""

from __future__ import annotations

from pathlib import Path

from redis.asyncio import Redis

from tests.support.waiting import wait_until

# `dir` is a protected setting in Redis 7: CONFIG SET may change it only when allowed.
WRITABLE_DIR = ("--enable-protected-configs", "yes")


async def _bgsave_status(redis: Redis) -> str:
    info = await redis.info("persistence")
    return "running" if info["rdb_bgsave_in_progress"] else str(info["rdb_last_bgsave_status"])


async def cannot_persist(redis: Redis, tmp_path: Path) -> None:
    """MISCONF: a save point is set and the last snapshot failed (its directory is gone,
    which stops root too), so with stop-writes-on-bgsave-error (the default) every write
    is refused."""
    gone = tmp_path / "gone"
    gone.mkdir()
    await redis.config_set("dir", str(gone))
    gone.rmdir()
    await redis.config_set("save", "3600 1")
    await redis.config_set("stop-writes-on-bgsave-error", "yes")
    await redis.bgsave()
    await wait_until(lambda: _failed(redis), "the snapshot to fail", within=30)


async def _failed(redis: Redis) -> bool:
    return await _bgsave_status(redis) == "err"


async def _saved(redis: Redis) -> bool:
    return await _bgsave_status(redis) == "ok"


async def persists_again(redis: Redis, tmp_path: Path) -> None:
    """The operator's fix: a directory it can write, and a snapshot that succeeds."""
    await redis.config_set("dir", str(tmp_path))
    await redis.bgsave()
    await wait_until(lambda: _saved(redis), "a snapshot to succeed", within=30)


async def full(redis: Redis) -> None:
    """OOM: a memory limit below what Redis already uses, and no eviction."""
    await redis.config_set("maxmemory-policy", "noeviction")
    await redis.config_set("maxmemory", "1")


async def not_full(redis: Redis) -> None:
    await redis.config_set("maxmemory", "0")
