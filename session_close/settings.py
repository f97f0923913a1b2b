"""Configuration: environment variables only, validated once at start."""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from marshmallow import Schema, ValidationError, validate
from marshmallow import fields as mf


class SettingsError(Exception):
    """A configuration variable is missing or invalid; the message names it."""


def setting(default: Any, field: mf.Field[Any]) -> Any:
    """One variable, declared once: its default and how its text is read and checked.
    The variable's name is the attribute's, upper-cased."""
    return dataclasses.field(default=default, metadata={"field": field})


_positive = validate.Range(min=0, min_inclusive=False)


_HOST_PORT = r"[^,:\s]+:[0-9]{1,5}"
_identifier = validate.Regexp(
    r"^[a-z_][a-z0-9_]{0,62}$", error="must be a lower-case SQL identifier"
)


def _url(*schemes: str) -> validate.Regexp:
    return validate.Regexp(rf"^({'|'.join(schemes)})://", error=f"must be a {schemes[0]}:// URL")


@dataclass(frozen=True, slots=True)
class Settings:
    http_host: str = setting("0.0.0.0", mf.String(validate=validate.Length(min=1)))
    http_port: int = setting(8080, mf.Integer(validate=validate.Range(min=0, max=65535)))
    metrics_port: int | None = setting(None, mf.Integer(validate=validate.Range(min=0, max=65535)))
    http_read_timeout_seconds: float = setting(30.0, mf.Float(validate=_positive))
    http_keepalive_timeout_seconds: float = setting(75.0, mf.Float(validate=_positive))
    redis_url: str = setting(
        "redis://localhost:6379/0", mf.String(validate=_url("redis", "rediss", "unix"))
    )
    # Outside every key's hash tag: braces in it would move the tag (docs/redis.md).
    redis_key_prefix: str = setting(
        "",
        mf.String(validate=validate.Regexp(r"^[^{}]*$", error="must not hold a brace ({{ or }})")),
    )
    # REDIS_URL names any node of a Redis Cluster; the client finds the others.
    redis_cluster: bool = setting(False, mf.Boolean())
    # Empty: REDIS_URL names the Redis. Else the primary is found through these Sentinels
    # (REDIS_URL then gives only the database number, user and password).
    redis_sentinels: str = setting(
        "",
        mf.String(
            validate=validate.Regexp(
                rf"^({_HOST_PORT}(,{_HOST_PORT})*)?$",
                error="must be comma-separated host:port pairs",
            )
        ),
    )
    redis_sentinel_master: str = setting("sessions", mf.String(validate=validate.Length(min=1)))
    # A close answers success only once this many replicas hold it (Redis WAIT).
    redis_min_replicas: int = setting(0, mf.Integer(validate=validate.Range(min=0, max=100)))
    redis_replica_timeout_seconds: float = setting(0.5, mf.Float(validate=_positive))
    redis_timeout_seconds: float = setting(1.0, mf.Float(validate=_positive))
    redis_max_connections: int = setting(16, mf.Integer(validate=validate.Range(min=2, max=10000)))
    close_batches_in_flight: int = setting(8, mf.Integer(validate=validate.Range(min=1, max=10000)))
    amqp_url: str = setting(
        "amqp://guest:guest@localhost:5672/", mf.String(validate=_url("amqp", "amqps"))
    )
    amqp_exchange: str = setting("sessions", mf.String(validate=validate.Length(min=1)))
    amqp_queue_prefix: str = setting("sessions.", mf.String())
    database_url: str = setting(
        "postgresql://postgres@localhost:5432/postgres",
        mf.String(validate=_url("postgresql", "postgres")),
    )
    audit_table: str = setting("session_audit", mf.String(validate=_identifier))
    tombstone_ttl_seconds: int = setting(86400, mf.Integer(validate=validate.Range(min=1)))
    event_source: str = setting(
        "/eliab/session-service", mf.String(validate=validate.Length(min=1))
    )
    log_level: str = setting(
        "INFO",
        mf.String(validate=validate.OneOf(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])),
    )
    relay_enabled: bool = setting(True, mf.Boolean())
    relay_batch_size: int = setting(200, mf.Integer(validate=validate.Range(min=1, max=10000)))
    relay_heartbeat_seconds: float = setting(5.0, mf.Float(validate=validate.Range(min=0.5)))
    publish_timeout_seconds: float = setting(5.0, mf.Float(validate=_positive))
    worker_prefetch: int = setting(100, mf.Integer(validate=validate.Range(min=1, max=65535)))
    worker_concurrency: int = setting(32, mf.Integer(validate=validate.Range(min=1, max=10000)))
    worker_metrics_port: int | None = setting(
        None, mf.Integer(validate=validate.Range(min=0, max=65535))
    )
    # /healthz and /metrics of `python -m outbox relay|sweeper` (outbox/probes.py).
    outbox_metrics_port: int = setting(8081, mf.Integer(validate=validate.Range(min=0, max=65535)))
    worker_max_attempts: int = setting(5, mf.Integer(validate=validate.Range(min=1, max=1000)))
    shutdown_timeout_seconds: float = setting(10.0, mf.Float(validate=_positive))
    session_expiry_grace_seconds: int = setting(3600, mf.Integer(validate=validate.Range(min=0)))
    sweeper_enabled: bool = setting(True, mf.Boolean())
    sweep_interval_seconds: float = setting(1.0, mf.Float(validate=_positive))
    sweep_batch_size: int = setting(500, mf.Integer(validate=validate.Range(min=1, max=10000)))
    close_all_batch_size: int = setting(500, mf.Integer(validate=validate.Range(min=1, max=10000)))
    # The transmitter (`python -m signals`, docs/signals.md).
    signals_http_host: str = setting("0.0.0.0", mf.String(validate=validate.Length(min=1)))
    signals_http_port: int = setting(8090, mf.Integer(validate=validate.Range(min=0, max=65535)))
    # The SETs' iss and the base of every SSF endpoint's URL.
    signals_issuer: str = setting(
        "http://localhost:8090", mf.String(validate=_url("https", "http"))
    )
    # Comma-separated PEM files of RSA keys (2048 bits or more): the first signs, all are
    # served in the JWKS (a rotation keeps the previous one listed).
    signals_signing_key_files: str = setting("", mf.String())
    # Receivers' URLs (and the issuer) must be https and public unless true (local use).
    signals_allow_http: bool = setting(False, mf.Boolean())
    signals_retention_seconds: int = setting(7 * 86400, mf.Integer(validate=validate.Range(min=60)))
    signals_db_schema: str = setting("signals", mf.String(validate=_identifier))

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """REDIS_SENTINELS as (host, port) pairs; empty when unset."""
        pairs = [item.rsplit(":", 1) for item in self.redis_sentinels.split(",") if item]
        return [(host, int(port)) for host, port in pairs]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every variable named in SettingsSchema; raise SettingsError naming the bad one."""
        environ = os.environ if environ is None else environ
        raw = {name: environ[name] for name in SettingsSchema.fields if name in environ}
        if isinstance(raw.get("LOG_LEVEL"), str):
            raw["LOG_LEVEL"] = raw["LOG_LEVEL"].upper()
        try:
            loaded = SettingsSchema.load(raw)
        except ValidationError as exc:
            messages = cast(dict[str, list[str]], exc.messages)
            problems = "; ".join(
                f"{name}={_shown(raw.get(name, ''))!r}: {' '.join(map(str, msgs))}"
                for name, msgs in sorted(messages.items())
            )
            raise SettingsError(f"invalid configuration: {problems}") from None
        settings = cls(**{name.lower(): value for name, value in loaded.items()})
        if settings.redis_cluster and (settings.redis_sentinels or settings.redis_min_replicas):
            # A cluster fails over by itself, and WAIT would need each node's connection.
            raise SettingsError(
                "invalid configuration: REDIS_CLUSTER=true goes with neither REDIS_SENTINELS"
                " nor REDIS_MIN_REPLICAS"
            )
        return settings


# Built from the fields above: every variable's name, reader and check, and nothing else.
SettingsSchema: Schema = Schema.from_dict(
    {f.name.upper(): f.metadata["field"] for f in dataclasses.fields(Settings)},
    name="SettingsSchema",
)()


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
    for f in dataclasses.fields(Settings):
        lines.append(f"  {f.name.upper():<26} {getattr(defaults, f.name)!r}")
    return "\n".join(lines)
