"""The transmitter as operators run it: its migration command, its probes and metrics,
what it refuses to start with, retention, and the webhook commands of sessionctl
(rotation included, verified with the official `standardwebhooks` library)."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import asyncpg
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from standardwebhooks import Webhook

from session_close.settings import Settings
from tests.signals.conftest import Receiver, Transmitter, register, sessionctl
from tests.support.paths import ROOT
from tests.support.processes import settings_env
from tests.support.waiting import wait_until
from tests.support.workers import Broker, make_event

StartReceiver = Callable[..., Awaitable[Receiver]]


async def run_signals(settings: Settings, *args: str, **env: str) -> tuple[int, str]:
    """`python -m signals <args>` to its end: exit code and everything it printed."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "signals",
        *args,
        cwd=ROOT,
        env=settings_env(settings, **env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode()


async def test_migrate_creates_the_schema_once_and_says_what_it_applied(
    settings: Settings, signals_schema: str
) -> None:
    code, out = await run_signals(settings, "migrate")
    assert code == 0, out
    assert "applied 1: " in out
    assert f"schema {signals_schema} is at version 1" in out
    code, out = await run_signals(settings, "migrate")
    assert code == 0, out
    assert f"schema {signals_schema} was up to date" in out
    conn = await asyncpg.connect(settings.database_url)
    try:
        versions = await conn.fetch(f'SELECT version FROM "{signals_schema}".schema_migrations')
    finally:
        await conn.close()
    assert [row[0] for row in versions] == [1]


async def test_it_refuses_to_start_without_a_usable_key_or_with_an_http_issuer(
    settings: Settings, signals_schema: str, tmp_path: Path
) -> None:
    weak = tmp_path / "weak.pem"
    weak.write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    not_a_key = tmp_path / "not-a-key.pem"
    not_a_key.write_text("hello")
    for files, said in (
        ("", "names no key file"),
        (str(weak), "1024 bits"),
        (str(not_a_key), "not an RSA private key"),
        (str(tmp_path / "missing.pem"), "not an RSA private key"),
    ):
        code, out = await run_signals(settings, SIGNALS_SIGNING_KEY_FILES=files)
        assert code == 1, out
        assert "SIGNALS_SIGNING_KEY_FILES" in out
        assert said in out
    code, out = await run_signals(
        dataclasses.replace(settings, signals_allow_http=False),
        SIGNALS_ISSUER="http://signals.example",
    )
    assert code == 1, out
    assert "SIGNALS_ISSUER must be https" in out


async def test_probes_and_per_receiver_metrics(
    settings: Settings,
    receivers: StartReceiver,
    transmitters: list[Transmitter],
    signals_queue: Broker,
) -> None:
    receiver = await receivers()
    webhook_id = await register(settings, receiver)
    transmitter = await Transmitter.start(settings)
    transmitters.append(transmitter)
    await signals_queue.publish(make_event(1), make_event(2))
    await wait_until(lambda: len(receiver.accepted()) == 2, "both events delivered")

    async with aiohttp.ClientSession(transmitter.url) as http:
        async with http.get("/healthz") as answer:
            assert answer.status == 200
            assert (await answer.json())["alive"] is True
        async with http.get("/readyz") as answer:
            assert answer.status == 200
            assert await answer.json() == {
                "status": "ready",
                "checks": {"amqp": "ok", "postgres": "ok"},
            }
        label = f'receiver="webhook:{webhook_id}"'
        expected = (
            f'signals_deliveries_total{{outcome="delivered",{label}}} 2.0',
            f"signals_pending_deliveries{{{label}}} 0.0",
            f"signals_oldest_pending_seconds{{{label}}} 0.0",
            f"signals_delivery_seconds_count{{{label}}} 2.0",
            'worker_messages_total{outcome="acked",worker="signals"} 2.0',
            "process_cpu_seconds_total",
        )

        async def counted() -> bool:
            # The receiver has its answer a moment before the transmitter counts it.
            async with http.get("/metrics") as answer:
                text = await answer.text()
            return all(line in text for line in expected)

        await wait_until(counted, f"the metrics of both deliveries: {expected}")


async def test_events_past_retention_are_forgotten(
    settings: Settings, transmitters: list[Transmitter], signals_queue: Broker
) -> None:
    transmitters.append(await Transmitter.start(settings))
    recent, old = make_event(1), make_event(2)
    await signals_queue.publish(recent, old)
    conn = await asyncpg.connect(settings.database_url)
    schema = settings.signals_db_schema
    try:

        async def recorded() -> int:
            return int(await conn.fetchval(f'SELECT count(*) FROM "{schema}".events'))

        await wait_until(lambda: _is(recorded(), 2), "both events recorded")
        await conn.execute(
            f"""UPDATE "{schema}".events SET recorded_at = now() - interval '2 hours'
                WHERE event_id = $1""",
            old.event_id,
        )
        # A transmitter keeping an hour purges at start (and every minute after).
        hour = dataclasses.replace(settings, signals_retention_seconds=3600)
        transmitters.append(await Transmitter.start(hour))
        await wait_until(lambda: _is(recorded(), 1), "the old event forgotten")
        left = await conn.fetchval(f'SELECT event_id::text FROM "{schema}".events')
        assert left == recent.event_id
    finally:
        await conn.close()


async def _is(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


async def test_a_rotated_webhook_secret_signs_beside_the_previous_one(
    settings: Settings,
    receivers: StartReceiver,
    transmitters: list[Transmitter],
    signals_queue: Broker,
) -> None:
    receiver = await receivers()
    webhook_id = await register(settings, receiver)
    previous = receiver.secret
    code, printed, err = await sessionctl(settings, "webhook", "rotate-secret", "--id", webhook_id)
    assert code == 0, err
    assert printed["secret"] != previous
    assert printed["previousSecretSignsForSeconds"] == 86400
    receiver.secret = printed["secret"]  # the receiver verifies with the new one
    transmitters.append(await Transmitter.start(settings))
    event = make_event(1)
    await signals_queue.publish(event)
    await wait_until(lambda: len(receiver.accepted()) == 1, "the event, verified")
    # ... and one that still holds the previous secret verifies the same request.
    [received] = receiver.received
    assert received.body["id"] == event.event_id
    assert len(received.headers["webhook-signature"].split()) == 2
    assert previous is not None
    assert Webhook(previous).verify(received.raw, received.headers) == received.body


async def test_sessionctl_webhook_refuses_what_it_must_not_store(
    settings: Settings, signals_schema: str
) -> None:
    strict = dataclasses.replace(settings, signals_allow_http=False)
    for args, said in (
        (["--url", "http://93.184.215.14/hook"], "must be https"),
        (["--url", "https://127.0.0.1/hook"], "loopback, private or link-local"),
        (["--url", "https://10.0.0.8/hook"], "loopback, private or link-local"),
        (["--url", "https://user:pw@93.184.215.14/hook"], "user or password"),
        (["--url", "https://93.184.215.14/hook", "--events", "session.opened"], "--events"),
    ):
        code, printed, err = await sessionctl(strict, "webhook", "add", *args)
        assert code == 1, (args, printed)
        assert said in err, err
    code, printed, err = await sessionctl(
        strict, "webhook", "add", "--url", "https://93.184.215.14/hook"
    )
    assert code == 0, err
    assert printed["events"] == ["session.closed", "session.expired"]
    assert printed["secret"].startswith("whsec_")
    code, listed, err = await sessionctl(strict, "webhook", "list")
    assert listed == {
        "webhooks": [
            {
                "webhookId": printed["webhookId"],
                "url": "https://93.184.215.14/hook",
                "events": ["session.closed", "session.expired"],
            }
        ]
    }
    for command in ("remove", "rotate-secret"):
        code, _, err = await sessionctl(strict, "webhook", command, "--id", "nope")
        assert code == 1
        assert "no webhook" in err
    code, _, err = await sessionctl(strict, "webhook", "remove", "--id", printed["webhookId"])
    assert code == 0, err
    assert (await sessionctl(strict, "webhook", "list"))[1] == {"webhooks": []}
