"""Processes a test starts itself (API, relay, workers) and can SIGKILL or SIGTERM."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

from session_close.settings import Settings
from tests.support.waiting import wait_until_blocking


def free_port() -> int:
    """A port free now; another process may take it before the caller binds it. For the
    API, prefer HTTP_PORT=0 and `listening_port`."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def settings_env(settings: Settings, **overrides: str) -> dict[str, str]:
    """The process environment that makes a child process use these settings (a setting
    that is None is left out, whatever this process's environment says), then
    `overrides` (variable names as in the environment)."""
    env = dict(os.environ)
    for f in fields(Settings):
        value = getattr(settings, f.name)
        if value is None:
            env.pop(f.name.upper(), None)
        else:
            env[f.name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
    env.update(overrides)
    return env


def wait_for_port(port: int, proc: subprocess.Popen[bytes], deadline: float = 15.0) -> None:
    def listening() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited early with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False

    wait_until_blocking(listening, f"something listening on {port}", within=deadline)


def listening_port(
    log: Path, proc: subprocess.Popen[bytes], deadline: float = 30.0, message: str = "listening"
) -> int:
    """The port a process bound when started on port 0 (LOG_LEVEL INFO or lower, its
    output in `log`), read from its log line: `listening` for `python -m service`,
    `serving metrics` for a worker's metrics port."""
    found: list[int] = []

    def logged() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited early with {proc.returncode}")
        for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
            if line.startswith("{") and f'"{message}"' in line:
                found.append(json.loads(line)["port"])
                return True
        return False

    wait_until_blocking(logged, f"a listening line in {log}", within=deadline)
    return found[0]


@contextmanager
def running(
    args: list[str], env: Mapping[str, str], log: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `python -m <args>` (its output appended to `log`, if given); kill it on the
    way out if the test did not stop it."""
    with open(log or os.devnull, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", *args], env=dict(env), stdout=out, stderr=subprocess.STDOUT
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


def log_tail(path: Path, lines: int = 40) -> str:
    """The end of a process's log, for an assertion message."""
    if not path.exists():
        return f"(no log at {path})"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def redis_server(tmp_path: Path, *options: str) -> Iterator[str]:
    """A redis-server of the test's own, on a unix socket (no port to race for); its URL."""
    sock = tmp_path / "redis.sock"
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            "0",
            "--unixsocket",
            str(sock),
            "--save",
            "",
            "--dir",
            str(tmp_path),
            *options,
        ],
        stdout=subprocess.DEVNULL,
    )
    try:

        def started() -> bool:
            assert proc.poll() is None, "redis-server exited"
            return sock.exists()

        wait_until_blocking(started, "redis-server to listen")
        yield f"unix://{sock}"
    finally:
        # SIGKILL, not SIGTERM: a redis-server that cannot write its snapshot (a MISCONF
        # test) refuses to shut down on SIGTERM and would outlive the test.
        proc.kill()
        proc.wait(10)
