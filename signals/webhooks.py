"""Standard Webhooks (standardwebhooks.com): the secrets and the signed headers.

A secret is `whsec_` and the base64 of 24 random bytes. Each request carries
`webhook-id` (the event id, the same on every attempt), `webhook-timestamp` (Unix
seconds of the attempt) and `webhook-signature`: `v1,` and the base64 HMAC-SHA256 of
`<id>.<timestamp>.<body>` under each secret in use, separated by spaces, so that a
receiver holding either secret of a rotation verifies it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Sequence

PREFIX = "whsec_"


def new_secret() -> str:
    return PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def signature(secrets_in_use: Sequence[str], message_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{message_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1,"
        + base64.b64encode(
            hmac.new(base64.b64decode(secret.removeprefix(PREFIX)), signed, hashlib.sha256).digest()
        ).decode()
        for secret in secrets_in_use
    )


def headers(
    secrets_in_use: Sequence[str], message_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(secrets_in_use, message_id, timestamp, body),
        "content-type": "application/json",
    }
