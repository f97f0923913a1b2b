"""The events' contract for readers who never see the code: an AsyncAPI 3.0 document of
the exchange, its routing keys and their messages, and the CloudEvent's JSON Schema,
both generated from the schema the producer and the workers validate with
(session_close/events.py), so they cannot drift apart.

`python -m session_close.asyncapi` prints the AsyncAPI document (docs/asyncapi.json);
`python -m session_close.asyncapi --schema` prints the JSON Schema
(docs/session-event.schema.json). `make docs` writes both.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, cast

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin

from session_close import __version__
from session_close.events import CLOSED, CONTENT_TYPE, EXPIRED, REASONS, CloudEventSchema
from session_close.topology import WORKERS

SCHEMA_ID = "session-event.schema.json"
AMQP_BINDING_VERSION = "0.3.0"


def event_json_schema() -> dict[str, Any]:
    """The CloudEvent as the producer writes it (strict), in JSON Schema 2020-12."""
    # A resolver naming no schema inlines the nested one; OpenAPI 3.1's schema objects are
    # JSON Schema 2020-12.
    plugin = MarshmallowPlugin(schema_name_resolver=cast(Any, lambda schema: None))
    APISpec(title="events", version=__version__, openapi_version="3.1.0", plugins=[plugin])
    assert plugin.converter is not None  # set when the spec registers the plugin
    schema: dict[str, Any] = plugin.converter.schema2jsonschema(CloudEventSchema)  # type: ignore[no-untyped-call]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "Session event (CloudEvents 1.0, structured mode)",
        "description": "A session.closed or session.expired event as this service publishes "
        f"it. The reason goes with the type: {json.dumps(REASONS)}; data.expiredAt is "
        "present in session.expired events only. Consumers read it as tolerant readers: "
        "unknown attributes and data fields are ignored, subject and time may be missing.",
        **schema,
    }


def _channel(event_type: str, description: str) -> dict[str, Any]:
    return {
        "address": event_type,
        "description": description,
        "messages": {_name(event_type): {"$ref": f"#/components/messages/{_name(event_type)}"}},
        "bindings": {
            "amqp": {
                "is": "routingKey",
                "exchange": {
                    "name": "sessions",
                    "type": "topic",
                    "durable": True,
                    "autoDelete": False,
                    "vhost": "/",
                },
                "bindingVersion": AMQP_BINDING_VERSION,
            }
        },
    }


def _name(event_type: str) -> str:
    return "sessionClosed" if event_type == CLOSED else "sessionExpired"


def _message(event_type: str, title: str, example: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": event_type,
        "title": title,
        "contentType": CONTENT_TYPE,
        "correlationId": {
            "description": "The HTTP request's X-Request-ID (null for session.expired).",
            "location": "$message.payload#/data/requestId",
        },
        "headers": {
            "type": "object",
            "properties": {
                "x-request-id": {
                    "type": "string",
                    "description": "The closing request's id ('' for session.expired).",
                }
            },
        },
        "payload": {"$ref": "#/components/schemas/SessionEvent"},
        "bindings": {"amqp": {"messageType": event_type, "bindingVersion": AMQP_BINDING_VERSION}},
        "examples": [{"name": example["data"]["reason"], "payload": example}],
    }


def _example(event_type: str, reason: str, **data: Any) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": "727ef388-93f6-4aac-811e-0d4b43418b3d",
        "source": "/eliab/session-service",
        "type": event_type,
        "time": "2026-11-27T18:39:58.077Z",
        "subject": "3f2a9c1e-demo",
        "datacontenttype": "application/json",
        "data": {
            "sessionId": "3f2a9c1e-demo",
            "userId": "42",
            "closedAt": "2026-11-27T18:39:58.077Z",
            "reason": reason,
            "os": "Android",
            "appVersion": "1.0.10",
            **data,
        },
    }


def build_document() -> dict[str, Any]:
    queues = ", ".join(f"`sessions.{worker}`" for worker in WORKERS)
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "eliab session events",
            "version": __version__,
            "description": "What the session close service publishes to RabbitMQ: one "
            "persistent message per session closed (`session.closed`, by a close or a "
            "close-all) or expired (`session.expired`, by the expiry sweeper), on the topic "
            "exchange `sessions` (AMQP_EXCHANGE) with the event type as routing key and "
            "`message_id` = the event id. Delivery is at least once: consumers drop repeats "
            f"by the event id. This service's own workers consume them from {queues} "
            "(quorum queues bound to both routing keys, each with a `.dlq`).",
            "license": {"name": "Proprietary"},
        },
        "defaultContentType": CONTENT_TYPE,
        "servers": {
            "rabbitmq": {
                "host": "localhost:5672",
                "protocol": "amqp",
                "protocolVersion": "0-9-1",
                "description": "AMQP_URL (make run: RabbitMQ on this machine)",
                "security": [{"$ref": "#/components/securitySchemes/amqpCredentials"}],
            }
        },
        "channels": {
            "sessionClosed": _channel(CLOSED, "A session was closed by its user."),
            "sessionExpired": _channel(EXPIRED, "A session reached its expires_at."),
        },
        "operations": {
            "publishSessionClosed": {
                "action": "send",
                "title": "Publish session.closed",
                "description": "Published by the outbox relay, with publisher confirms, once "
                "per session closed (exactly one event per session; at least one delivery).",
                "channel": {"$ref": "#/channels/sessionClosed"},
                "security": [{"$ref": "#/components/securitySchemes/amqpCredentials"}],
                "messages": [{"$ref": "#/channels/sessionClosed/messages/sessionClosed"}],
                "bindings": {
                    "amqp": {
                        "deliveryMode": 2,
                        "mandatory": True,
                        "bindingVersion": AMQP_BINDING_VERSION,
                    }
                },
            },
            "publishSessionExpired": {
                "action": "send",
                "title": "Publish session.expired",
                "description": "Published by the outbox relay once per session the sweeper "
                "expired (within SWEEP_INTERVAL_SECONDS + 2 s of its expires_at).",
                "channel": {"$ref": "#/channels/sessionExpired"},
                "security": [{"$ref": "#/components/securitySchemes/amqpCredentials"}],
                "messages": [{"$ref": "#/channels/sessionExpired/messages/sessionExpired"}],
                "bindings": {
                    "amqp": {
                        "deliveryMode": 2,
                        "mandatory": True,
                        "bindingVersion": AMQP_BINDING_VERSION,
                    }
                },
            },
        },
        "components": {
            "messages": {
                "sessionClosed": _message(
                    CLOSED,
                    "A session was closed (reason user_logout or user_logout_all)",
                    _example(CLOSED, "user_logout", requestId="b4cb022941cf4f64afcd9e7b188c3244"),
                ),
                "sessionExpired": _message(
                    EXPIRED,
                    "A session reached its expires_at (reason expired)",
                    _example(
                        EXPIRED, "expired", requestId=None, expiredAt="2026-11-27T18:39:57.000Z"
                    ),
                ),
            },
            "schemas": {"SessionEvent": event_json_schema()},
            "securitySchemes": {
                "amqpCredentials": {
                    "type": "userPassword",
                    "description": "The user and password of AMQP_URL.",
                }
            },
        },
    }


def dumps(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m session_close.asyncapi",
        description="Print the events' AsyncAPI 3.0 document, or with --schema the "
        "CloudEvent's JSON Schema.",
    )
    parser.add_argument("--schema", action="store_true", help="print the JSON Schema")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    args = parser.parse_args(argv)
    sys.stdout.write(dumps(event_json_schema() if args.schema else build_document()))


if __name__ == "__main__":
    main()
