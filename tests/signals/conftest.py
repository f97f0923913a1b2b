"""The transmitter's tests: its own PostgreSQL schema per test (dropped after), webhook
receivers on 127.0.0.1 that verify each request with the official `standardwebhooks`
library (not the transmitter's signing code), and transmitter processes the test starts
itself and may SIGKILL."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from standardwebhooks import Webhook, WebhookVerificationError

from session_close.settings import Settings
from tests.support.paths import ROOT
from tests.support.processes import free_port, settings_env
from tests.support.workers import Broker, WorkerProcess


@pytest.fixture(scope="session")
def signing_keys(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two RSA keys in PEM files: the first signs; the second stands for the previous
    key of a rotation."""
    folder = tmp_path_factory.mktemp("signing-keys")
    paths = []
    for n in range(2):
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        path = folder / f"key-{n}.pem"
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        paths.append(path)
    return paths


@pytest.fixture
def settings(settings: Settings, test_id: str, signing_keys: list[Path]) -> Settings:
    # Receivers are local test servers: plain http on loopback.
    return dataclasses.replace(
        settings,
        signals_db_schema=f"signals_{test_id}",
        signals_allow_http=True,
        signals_signing_key_files=",".join(map(str, signing_keys)),
    )


@pytest.fixture
async def signals_schema(settings: Settings) -> AsyncIterator[str]:
    """The test's schema; dropped with everything in it afterwards."""
    yield settings.signals_db_schema
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{settings.signals_db_schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
async def signals_queue(broker: Broker) -> Broker:
    """The transmitter's queue declared before any event is published (the transmitter
    declares it too; a message published before any declaration would be unroutable)."""
    await broker.topology.declare(await broker.channel(), ("signals",))
    return broker


async def sessionctl(settings: Settings, *args: str) -> tuple[int, dict[str, Any], str]:
    """Run `sessionctl <args>` with the test's settings: exit code, JSON printed, stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "session_close.cli",
        *args,
        cwd=ROOT,
        env=settings_env(settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    printed = json.loads(out) if out.strip() else {}
    return process.returncode, printed, err.decode()


@dataclass
class Received:
    webhook_id: str
    timestamp: int
    body: dict[str, Any]
    at: float  # time.time() on arrival
    raw: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    status: int | None = None  # the answer, once given


Behaviour = Callable[[web.Request, int], Awaitable[web.StreamResponse]]


async def accept(request: web.Request, attempt: int) -> web.StreamResponse:
    return web.Response(status=204)


@dataclass
class Receiver:
    """A webhook endpoint. Every request is verified with `standardwebhooks` against the
    secret the test registered; verified ones are in `received` (attempts included), the
    others in `refused`. `behaviour(request, n)` answers the n-th request (from 1)."""

    behaviour: Behaviour = accept
    secret: str | None = None
    received: list[Received] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/hook"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        assert self.secret is not None, "the test registers the webhook before events flow"
        try:
            verified = Webhook(self.secret).verify(body, dict(request.headers))
        except WebhookVerificationError as exc:
            self.refused.append(str(exc))
            return web.Response(status=401)
        received = Received(
            request.headers["webhook-id"],
            int(request.headers["webhook-timestamp"]),
            verified,
            time.time(),
            body,
            dict(request.headers),
        )
        self.received.append(received)
        answer = await self.behaviour(request, len(self.received))
        received.status = answer.status
        return answer

    def ids(self) -> list[str]:
        """webhook-id of every attempt, in order."""
        return [r.webhook_id for r in self.received]

    def accepted(self) -> list[str]:
        """webhook-id of every attempt answered 2xx."""
        return [r.webhook_id for r in self.received if r.status and 200 <= r.status < 300]


@pytest.fixture
async def receivers() -> AsyncIterator[Callable[..., Awaitable[Receiver]]]:
    started: list[Receiver] = []

    async def start(behaviour: Behaviour = accept) -> Receiver:
        receiver = await Receiver(behaviour).start()
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        await receiver.stop()


async def register(settings: Settings, receiver: Receiver, *events: str) -> str:
    """`sessionctl webhook add` for this receiver; its webhookId."""
    args = ["webhook", "add", "--url", receiver.url]
    if events:
        args += ["--events", ",".join(events)]
    code, printed, err = await sessionctl(settings, *args)
    assert code == 0, err
    receiver.secret = printed["secret"]
    return str(printed["webhookId"])


class Transmitter(WorkerProcess):
    """`python -m signals` as a subprocess on a port of its own, whose URL is also its
    issuer unless one is given; its JSON log lines collected (as a worker's)."""

    url = ""

    @classmethod
    async def start(  # type: ignore[override]
        cls, settings: Settings, *, issuer: str | None = None, **env: str
    ) -> Transmitter:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "signals",
            cwd=ROOT,
            env=settings_env(
                settings,
                SIGNALS_HTTP_PORT=str(port),
                SIGNALS_HTTP_HOST="127.0.0.1",
                SIGNALS_ISSUER=issuer or url,
                **env,
            ),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        transmitter = cls(process)
        transmitter.url = url
        await transmitter.wait_logged("worker consuming", timeout=30)
        await transmitter.wait_logged("signals listening", timeout=30)
        return transmitter

    def kill(self) -> None:
        self.process.kill()


@pytest.fixture
async def transmitters(
    signals_schema: str, signals_queue: Broker
) -> AsyncIterator[list[Transmitter]]:
    """Append started Transmitters here; any still running are killed after."""
    started: list[Transmitter] = []
    yield started
    for transmitter in started:
        await transmitter.close()


@dataclass
class Pushed:
    """One RFC 8935 push as the test's SET receiver got it."""

    token: str
    headers: dict[str, str]
    at: float
    status: int | None = None


@dataclass
class SetReceiver:
    """An RFC 8935 push endpoint: records each SET with its headers; `behaviour(request,
    n)` answers the n-th push (202 by default). Verifying is the test's (PyJWT)."""

    behaviour: Behaviour | None = None
    pushed: list[Pushed] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self) -> SetReceiver:
        app = web.Application()
        app.router.add_post("/events", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/events"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        pushed = Pushed((await request.read()).decode(), dict(request.headers), time.time())
        self.pushed.append(pushed)
        answer = (
            web.Response(status=202)
            if self.behaviour is None
            else await self.behaviour(request, len(self.pushed))
        )
        pushed.status = answer.status
        return answer

    def accepted(self) -> list[Pushed]:
        return [p for p in self.pushed if p.status and 200 <= p.status < 300]


@pytest.fixture
async def set_receivers() -> AsyncIterator[Callable[..., Awaitable[SetReceiver]]]:
    started: list[SetReceiver] = []

    async def start(behaviour: Behaviour | None = None) -> SetReceiver:
        receiver = await SetReceiver(behaviour).start()
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        await receiver.stop()


async def ssf_receiver(settings: Settings, name: str) -> tuple[str, str]:
    """`sessionctl receiver add --name`: (receiverId, token)."""
    code, printed, err = await sessionctl(settings, "receiver", "add", "--name", name)
    assert code == 0, err
    return str(printed["receiverId"]), str(printed["token"])
