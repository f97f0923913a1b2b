"""Configuration (the README's table): environment variables only, validated at start with
an error naming the bad variable, and `--help` on the entry point."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from session_close.settings import Settings, SettingsError
from tests.support.paths import ROOT

SPEC_DEFAULTS = {
    "HTTP_HOST": "0.0.0.0",
    "HTTP_PORT": 8080,
    "REDIS_URL": "redis://localhost:6379/0",
    "REDIS_KEY_PREFIX": "",
    "AMQP_URL": "amqp://guest:guest@localhost:5672/",
    "AMQP_EXCHANGE": "sessions",
    "AMQP_QUEUE_PREFIX": "sessions.",
    "DATABASE_URL": "postgresql://postgres@localhost:5432/postgres",
    "AUDIT_TABLE": "session_audit",
    "TOMBSTONE_TTL_SECONDS": 86400,
    "EVENT_SOURCE": "/eliab/session-service",
    "LOG_LEVEL": "INFO",
    "HTTP_READ_TIMEOUT_SECONDS": 30,
    "HTTP_KEEPALIVE_TIMEOUT_SECONDS": 75,
    "WORKER_MAX_ATTEMPTS": 5,
    # Redis behind Sentinel
    "REDIS_SENTINELS": "",
    "REDIS_SENTINEL_MASTER": "sessions",
    "REDIS_MIN_REPLICAS": 0,
    "REDIS_REPLICA_TIMEOUT_SECONDS": 0.5,
    # the transmitter (docs/signals.md)
    "SIGNALS_HTTP_HOST": "0.0.0.0",
    "SIGNALS_HTTP_PORT": 8090,
    "SIGNALS_ISSUER": "http://localhost:8090",
    "SIGNALS_ALLOW_HTTP": False,
    "SIGNALS_RETENTION_SECONDS": 7 * 86400,
    "SIGNALS_DB_SCHEMA": "signals",
}

# One valid, non-default value for every variable, and what it must become.
VALID = {
    "HTTP_HOST": ("127.0.0.1", "127.0.0.1"),
    "HTTP_PORT": ("9090", 9090),
    "METRICS_PORT": ("9091", 9091),
    "HTTP_READ_TIMEOUT_SECONDS": ("2.5", 2.5),
    "HTTP_KEEPALIVE_TIMEOUT_SECONDS": ("5", 5.0),
    "REDIS_URL": ("redis://127.0.0.1:6380/2", "redis://127.0.0.1:6380/2"),
    "REDIS_KEY_PREFIX": ("eliab:", "eliab:"),
    "REDIS_TIMEOUT_SECONDS": ("0.25", 0.25),
    "REDIS_MAX_CONNECTIONS": ("40", 40),
    "CLOSE_BATCHES_IN_FLIGHT": ("3", 3),
    "AMQP_URL": ("amqp://u:p@127.0.0.1:5673/vh", "amqp://u:p@127.0.0.1:5673/vh"),
    "AMQP_EXCHANGE": ("other", "other"),
    "AMQP_QUEUE_PREFIX": ("q.", "q."),
    "DATABASE_URL": ("postgresql://a@127.0.0.1/db", "postgresql://a@127.0.0.1/db"),
    "AUDIT_TABLE": ("audit_log", "audit_log"),
    "TOMBSTONE_TTL_SECONDS": ("60", 60),
    "EVENT_SOURCE": ("/elsewhere", "/elsewhere"),
    "LOG_LEVEL": ("DEBUG", "DEBUG"),
    "RELAY_ENABLED": ("false", False),
    "RELAY_BATCH_SIZE": ("10", 10),
    "RELAY_HEARTBEAT_SECONDS": ("2.5", 2.5),
    "PUBLISH_TIMEOUT_SECONDS": ("3", 3.0),
    "WORKER_PREFETCH": ("7", 7),
    "WORKER_CONCURRENCY": ("3", 3),
    "WORKER_METRICS_PORT": ("9100", 9100),
    "OUTBOX_METRICS_PORT": ("9101", 9101),
    "WORKER_MAX_ATTEMPTS": ("3", 3),
    "SHUTDOWN_TIMEOUT_SECONDS": ("4", 4.0),
    "SESSION_EXPIRY_GRACE_SECONDS": ("600", 600),
    "SWEEPER_ENABLED": ("false", False),
    "SWEEP_INTERVAL_SECONDS": ("0.5", 0.5),
    "SWEEP_BATCH_SIZE": ("50", 50),
    "CLOSE_ALL_BATCH_SIZE": ("50", 50),
    "REDIS_SENTINELS": ("s1:26379,10.0.0.2:26380", "s1:26379,10.0.0.2:26380"),
    "REDIS_SENTINEL_MASTER": ("mymaster", "mymaster"),
    # "true" goes with neither REDIS_SENTINELS nor REDIS_MIN_REPLICAS, set above: read
    # here as false (its own tests below read true).
    "REDIS_CLUSTER": ("0", False),
    "REDIS_MIN_REPLICAS": ("1", 1),
    "REDIS_REPLICA_TIMEOUT_SECONDS": ("0.25", 0.25),
    "SIGNALS_HTTP_HOST": ("127.0.0.1", "127.0.0.1"),
    "SIGNALS_HTTP_PORT": ("9095", 9095),
    "SIGNALS_ISSUER": ("https://signals.example.com", "https://signals.example.com"),
    "SIGNALS_SIGNING_KEY_FILES": ("/keys/new.pem,/keys/old.pem", "/keys/new.pem,/keys/old.pem"),
    "SIGNALS_ALLOW_HTTP": ("true", True),
    "SIGNALS_RETENTION_SECONDS": ("3600", 3600),
    "SIGNALS_DB_SCHEMA": ("signals_eu", "signals_eu"),
}

INVALID = [
    ("HTTP_PORT", "http"),
    ("HTTP_PORT", "70000"),
    ("HTTP_PORT", ""),
    ("METRICS_PORT", "70000"),
    ("HTTP_HOST", ""),
    ("REDIS_URL", "localhost:6379"),
    ("REDIS_TIMEOUT_SECONDS", "0"),
    ("HTTP_READ_TIMEOUT_SECONDS", "0"),
    ("HTTP_KEEPALIVE_TIMEOUT_SECONDS", "soon"),
    ("REDIS_MAX_CONNECTIONS", "1"),
    ("CLOSE_BATCHES_IN_FLIGHT", "0"),
    ("AMQP_URL", "http://localhost:5672/"),
    ("AMQP_EXCHANGE", ""),
    ("DATABASE_URL", "mysql://localhost/db"),
    ("AUDIT_TABLE", "audit; drop table x"),
    ("TOMBSTONE_TTL_SECONDS", "0"),
    ("TOMBSTONE_TTL_SECONDS", "1d"),
    ("EVENT_SOURCE", ""),
    ("LOG_LEVEL", "LOUD"),
    ("RELAY_ENABLED", "perhaps"),
    ("RELAY_BATCH_SIZE", "0"),
    ("RELAY_HEARTBEAT_SECONDS", "0.1"),
    ("PUBLISH_TIMEOUT_SECONDS", "-1"),
    ("WORKER_PREFETCH", "many"),
    ("OUTBOX_METRICS_PORT", "70000"),
    ("SESSION_EXPIRY_GRACE_SECONDS", "-1"),
    ("SWEEP_INTERVAL_SECONDS", "0"),
    ("SWEEP_BATCH_SIZE", "0"),
    ("CLOSE_ALL_BATCH_SIZE", "0"),
    ("WORKER_MAX_ATTEMPTS", "0"),
    ("REDIS_SENTINELS", "s1"),
    ("REDIS_SENTINELS", "s1:26379,"),
    ("REDIS_SENTINEL_MASTER", ""),
    ("REDIS_CLUSTER", "perhaps"),
    ("REDIS_KEY_PREFIX", "app{1}:"),
    ("REDIS_MIN_REPLICAS", "-1"),
    ("REDIS_REPLICA_TIMEOUT_SECONDS", "0"),
    ("SIGNALS_HTTP_PORT", "70000"),
    ("SIGNALS_ISSUER", "signals.example.com"),
    ("SIGNALS_ALLOW_HTTP", "perhaps"),
    ("SIGNALS_RETENTION_SECONDS", "59"),
    ("SIGNALS_DB_SCHEMA", "Signals; drop schema public"),
]


def test_defaults_are_the_spec_table() -> None:
    settings = Settings.from_env({})
    assert settings == Settings()
    for name, default in SPEC_DEFAULTS.items():
        assert getattr(settings, name.lower()) == default, name


def test_every_setting_is_read_from_its_variable() -> None:
    assert {f.name.upper() for f in dataclasses.fields(Settings)} == set(VALID)
    settings = Settings.from_env({name: raw for name, (raw, _) in VALID.items()})
    for name, (_, value) in VALID.items():
        assert getattr(settings, name.lower()) == value, name


def test_redis_cluster_is_read_as_true() -> None:
    assert Settings.from_env({"REDIS_CLUSTER": "true"}).redis_cluster is True


@pytest.mark.parametrize(
    "other", [{"REDIS_SENTINELS": "s1:26379"}, {"REDIS_MIN_REPLICAS": "1"}], ids=str
)
def test_redis_cluster_goes_with_neither_sentinels_nor_min_replicas(other: dict[str, str]) -> None:
    [name] = other
    with pytest.raises(SettingsError, match=f"REDIS_CLUSTER=true goes with neither.*{name}"):
        Settings.from_env({"REDIS_CLUSTER": "true", **other})


def test_unrelated_variables_are_ignored() -> None:
    assert Settings.from_env({"PATH": "/bin", "HOME": "/root"}) == Settings()


@pytest.mark.parametrize(("name", "value"), INVALID)
def test_a_bad_variable_fails_naming_it(name: str, value: str) -> None:
    with pytest.raises(SettingsError) as failure:
        Settings.from_env({name: value})
    message = str(failure.value)
    assert name in message
    others = {n for n in VALID if n != name and n not in name}
    assert [n for n in others if n in message] == []


def test_every_bad_variable_is_named_at_once() -> None:
    with pytest.raises(SettingsError) as failure:
        Settings.from_env({"HTTP_PORT": "x", "LOG_LEVEL": "LOUD"})
    assert "HTTP_PORT" in str(failure.value)
    assert "LOG_LEVEL" in str(failure.value)


def test_a_bad_url_error_does_not_print_its_password() -> None:
    with pytest.raises(SettingsError) as failure:
        Settings.from_env({"AMQP_URL": "http://guest:s3cret@localhost:5672/"})
    assert "AMQP_URL" in str(failure.value)
    assert "s3cret" not in str(failure.value)


def run_service(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        env=os.environ | env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_the_service_refuses_to_start_with_a_bad_variable_and_names_it() -> None:
    result = run_service(TOMBSTONE_TTL_SECONDS="forever")
    assert result.returncode != 0
    assert "TOMBSTONE_TTL_SECONDS" in result.stderr
    assert "Traceback" not in result.stderr


def test_service_help_lists_the_commands_and_every_variable() -> None:
    result = run_service("--help")
    assert result.returncode == 0, result.stderr
    assert "relay" in result.stdout
    for field in dataclasses.fields(Settings):
        assert field.name.upper() in result.stdout


def test_service_help_works_even_with_a_bad_variable() -> None:
    result = run_service("--help", HTTP_PORT="x")
    assert result.returncode == 0, result.stderr
    assert "HTTP_PORT" in result.stdout


def test_the_readme_configuration_table_lists_every_variable_with_its_default() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = {
        cells[0].strip("` "): cells[1].strip()
        for line in section.splitlines()
        if line.startswith("| `")
        for cells in [line.strip("|").split("|")]
    }
    defaults = Settings()
    expected = {}
    for field in dataclasses.fields(Settings):
        value = getattr(defaults, field.name)
        if value is None:
            expected[field.name.upper()] = "(unset)"
        elif value == "":
            expected[field.name.upper()] = "(empty)"
        else:
            shown = str(value).lower() if isinstance(value, bool) else str(value)
            expected[field.name.upper()] = f"`{shown}`"
    assert rows == expected


def test_log_level_is_accepted_in_any_case() -> None:
    assert Settings.from_env({"LOG_LEVEL": "debug"}).log_level == "DEBUG"
