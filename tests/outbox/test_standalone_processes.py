"""The standalone relay and sweeper (`python -m outbox relay|sweeper`) serve /healthz and
/metrics on OUTBOX_METRICS_PORT from their own event loop: started as processes, each
answers both, its metrics counting its own work; a stopped loop fails the probe; and the
liveness rule itself (outbox/probes.py): a stale heartbeat or ended work answers 503."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from pytest_aiohttp.plugin import AiohttpClient
from redis.asyncio import Redis

from outbox.probes import Liveness, outbox_registry, probes_app
from session_close.cli import create_session
from session_close.keys import Keys
from session_close.settings import Settings
from tests.outbox.test_relay import write_outbox
from tests.support.processes import listening_port, log_tail, running, settings_env
from tests.support.waiting import wait_until

# A kubelet-like probe: an answer within this long, or the probe failed.
PROBE_TIMEOUT = 3.0


@contextmanager
def standalone(
    command: str, settings: Settings, tmp_path: Path, **env: str
) -> Iterator[tuple[str, int]]:
    """`python -m outbox <command>` with its probes on a free port: their base URL, and
    the process id."""
    log = tmp_path / f"{command}.log"
    environ = settings_env(settings, OUTBOX_METRICS_PORT="0", LOG_LEVEL="INFO", **env)
    with running(["outbox", command], environ, log) as proc:
        port = listening_port(log, proc, message="serving metrics")
        yield f"http://127.0.0.1:{port}", proc.pid
        proc.terminate()
        assert proc.wait(15) == 0, log_tail(log)


async def get(url: str) -> tuple[int, str]:
    timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as resp:
        return resp.status, await resp.text()


def sample(metrics: str, series: str) -> float | None:
    for line in metrics.splitlines():
        if line.startswith(f"{series} "):
            return float(line.split()[-1])
    return None


async def test_standalone_relay_serves_healthz_and_metrics_counting_its_publishes(
    settings: Settings, redis: Redis, keys: Keys, amqp_cleanup: None, tmp_path: Path
) -> None:
    with standalone("relay", settings, tmp_path) as (base, _):
        assert (await get(f"{base}/healthz"))[0] == 200
        await write_outbox(redis, keys, 3)
        metrics: list[str] = []

        # A scrape reads the backlog from Redis before it renders the counters, and the
        # relay may settle in between: a scrape can count 3 publishes beside a backlog of
        # 3 read just before, so wait for one that shows both done.
        async def published() -> bool:
            status, text = await get(f"{base}/metrics")
            metrics[:] = [text]
            return (
                status == 200
                and sample(text, "outbox_relay_published_total") == 3.0
                and sample(text, "outbox_backlog") == 0.0
            )

        await wait_until(published, "3 publishes counted and an empty outbox", within=20)
        assert sample(metrics[0], "outbox_relay_publish_failures_total") == 0.0
        assert sample(metrics[0], "process_resident_memory_bytes")


async def test_standalone_sweeper_serves_healthz_and_metrics_counting_its_sweeps(
    settings: Settings, redis: Redis, keys: Keys, tmp_path: Path
) -> None:
    with standalone("sweeper", settings, tmp_path, SWEEP_INTERVAL_SECONDS="0.2") as (base, _):
        assert (await get(f"{base}/healthz"))[0] == 200
        await create_session(redis, keys, "u-sweep", "sweep-session-1", ttl=1, expiry_grace=60)

        async def swept() -> bool:
            status, text = await get(f"{base}/metrics")
            return (
                status == 200 and sample(text, 'sweeper_sessions_total{outcome="expired"}') == 1.0
            )

        await wait_until(swept, "the sweeper's metrics to count the expired session", within=20)


async def test_a_stopped_relay_loop_fails_its_liveness_probe_until_it_runs_again(
    settings: Settings, redis: Redis, amqp_cleanup: None, tmp_path: Path
) -> None:
    with standalone("relay", settings, tmp_path) as (base, pid):
        os.kill(pid, signal.SIGSTOP)  # the whole process, its event loop included
        try:
            with pytest.raises(asyncio.TimeoutError):
                await get(f"{base}/healthz")
        finally:
            os.kill(pid, signal.SIGCONT)

        async def alive() -> bool:
            return (await get(f"{base}/healthz"))[0] == 200

        await wait_until(alive, "the relay to answer its probe again", within=20)


@pytest.fixture
def probed(
    settings: Settings, redis: Redis, aiohttp_client: AiohttpClient
) -> tuple[Liveness, AiohttpClient, web.Application]:
    liveness = Liveness(stale_after=0.2)
    registry, metrics = outbox_registry()
    return liveness, aiohttp_client, probes_app(liveness, metrics, registry, redis, settings)


async def test_liveness_fails_once_the_loop_heartbeat_is_older_than_its_bound(
    probed: tuple[Liveness, AiohttpClient, web.Application],
) -> None:
    liveness, aiohttp_client, app = probed
    client = await aiohttp_client(app)
    # Nothing beats: the heartbeat ages as a stuck loop's would.
    assert (await client.get("/healthz")).status == 200

    async def failing() -> bool:
        return (await client.get("/healthz")).status == 503

    await wait_until(failing, "/healthz to answer 503 once the heartbeat is stale", within=5)
    beating = asyncio.create_task(liveness.beat_forever(every=0.05))
    try:

        async def alive() -> bool:
            return (await client.get("/healthz")).status == 200

        await wait_until(alive, "/healthz to answer 200 while the loop beats", within=5)
    finally:
        beating.cancel()


async def test_liveness_fails_once_the_relay_or_sweeper_work_has_ended(
    probed: tuple[Liveness, AiohttpClient, web.Application],
) -> None:
    liveness, aiohttp_client, app = probed
    liveness.stale_after = 60.0
    client = await aiohttp_client(app)

    async def ends_at_once() -> None:
        return None

    liveness.work = asyncio.create_task(ends_at_once())
    await liveness.work
    reply = await client.get("/healthz")
    assert reply.status == 503
    assert (await reply.json())["alive"] is False
