"""Configuration: environment variables only, validated once at start."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, cast

from marshmallow import Schema, ValidationError, post_load, pre_load, validate
from marshmallow import fields as mf


class SettingsError(Exception):
    """A configuration variable is missing or invalid; the message names it."""


_positive = validate.Range(min=0, min_inclusive=False)


class SettingsSchema(Schema):
    HTTP_HOST = mf.String(validate=validate.Length(min=1))
    HTTP_PORT = mf.Integer(validate=validate.Range(min=0, max=65535))
    REDIS_URL = mf.String(
        validate=validate.Regexp(r"^(redis|rediss|unix)://", error="must be a redis:// URL"),
    )
    REDIS_KEY_PREFIX = mf.String()
    REDIS_TIMEOUT_SECONDS = mf.Float(validate=_positive)
    AMQP_URL = mf.String(
        validate=validate.Regexp(r"^amqps?://", error="must be an amqp:// URL"),
    )
    AMQP_EXCHANGE = mf.String(validate=validate.Length(min=1))
    AMQP_QUEUE_PREFIX = mf.String()
    DATABASE_URL = mf.String(
        validate=validate.Regexp(r"^postgres(ql)?://", error="must be a postgresql:// URL"),
    )
    AUDIT_TABLE = mf.String(
        validate=validate.Regexp(
            r"^[a-z_][a-z0-9_]{0,62}$", error="must be a lower-case SQL identifier"
        ),
    )
    TOMBSTONE_TTL_SECONDS = mf.Integer(validate=validate.Range(min=1))
    EVENT_SOURCE = mf.String(validate=validate.Length(min=1))
    LOG_LEVEL = mf.String(
        validate=validate.OneOf(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]),
    )
    RELAY_ENABLED = mf.Boolean()
    RELAY_BATCH_SIZE = mf.Integer(validate=validate.Range(min=1, max=10000))
    RELAY_CLAIM_IDLE_SECONDS = mf.Float(validate=_positive)
    PUBLISH_TIMEOUT_SECONDS = mf.Float(validate=_positive)
    READY_MAX_BACKLOG = mf.Integer(validate=validate.Range(min=1))
    WORKER_PREFETCH = mf.Integer(validate=validate.Range(min=1, max=65535))
    WORKER_CONCURRENCY = mf.Integer(validate=validate.Range(min=1, max=10000))
    WORKER_METRICS_PORT = mf.Integer(validate=validate.Range(min=0, max=65535))
    SHUTDOWN_TIMEOUT_SECONDS = mf.Float(validate=_positive)

    @pre_load
    def level_in_any_case(self, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        if isinstance(data.get("LOG_LEVEL"), str):
            data = {**data, "LOG_LEVEL": data["LOG_LEVEL"].upper()}
        return data

    @post_load
    def make(self, data: dict[str, Any], **_: Any) -> Settings:
        return Settings(**{k.lower(): v for k, v in data.items()})


@dataclass(frozen=True, slots=True)
class Settings:
    http_host: str = "0.0.0.0"
    http_port: int = 8080
    redis_url: str = "redis://localhost:6379/0"
    redis_key_prefix: str = ""
    redis_timeout_seconds: float = 1.0
    amqp_url: str = "amqp://guest:guest@localhost:5672/"
    amqp_exchange: str = "sessions"
    amqp_queue_prefix: str = "sessions."
    database_url: str = "postgresql://postgres@localhost:5432/postgres"
    audit_table: str = "session_audit"
    tombstone_ttl_seconds: int = 86400
    event_source: str = "/eliab/session-service"
    log_level: str = "INFO"
    relay_enabled: bool = True
    relay_batch_size: int = 200
    relay_claim_idle_seconds: float = 30.0
    publish_timeout_seconds: float = 5.0
    ready_max_backlog: int = 10000
    worker_prefetch: int = 100
    worker_concurrency: int = 32
    worker_metrics_port: int | None = None
    shutdown_timeout_seconds: float = 10.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every variable named in SettingsSchema; raise SettingsError naming the bad one."""
        environ = os.environ if environ is None else environ
        names = SettingsSchema().fields.keys()
        raw = {name: environ[name] for name in names if name in environ}
        try:
            settings: Settings = SettingsSchema().load(raw)
        except ValidationError as exc:
            messages = cast(dict[str, list[str]], exc.messages)
            problems = "; ".join(
                f"{name}={_shown(raw.get(name, ''))!r}: {' '.join(map(str, msgs))}"
                for name, msgs in sorted(messages.items())
            )
            raise SettingsError(f"invalid configuration: {problems}") from None
        return settings


def _shown(value: str) -> str:
    # The error goes to stderr and the orchestrator's logs: keep URL passwords out.
    return re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", value)


def settings_or_exit(prog: str) -> Settings:
    """Settings.from_env() for a command's main(): a bad variable ends it with the message."""
    try:
        return Settings.from_env()
    except SettingsError as exc:
        sys.exit(f"{prog}: {exc}")


def env_help() -> str:
    """The variables and their defaults, for --help of every command."""
    defaults = Settings()
    lines = ["environment variables (default):"]
    for f in fields(Settings):
        lines.append(f"  {f.name.upper():<26} {getattr(defaults, f.name)!r}")
    return "\n".join(lines)
