"""Security Event Tokens (RFC 8417) as SSF 1.0 and CAEP 1.0 profile them, signed with
joserfc.

joserfc signs: it is typed, kept by the Authlib maintainers, and does JWS, JWK and JWK
thumbprints without a second library; the tests verify with PyJWT (a receiver's library,
not the signer's).

A session ending becomes a CAEP `session-revoked` SET; a stream's verification request a
verification SET echoing its `state`. Header: `typ` `secevent+jwt`, RS256, `kid` (the
key's RFC 7638 thumbprint). Claims: `iss`, `aud` (the stream's audience), `iat`, `jti`
(the delivery's, stable per event and stream), `txn` (the request id, when there is
one), `sub_id` and one event; no `sub`, no `exp`. RS256 is deterministic, so a retried
delivery sends the same bytes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from joserfc import jwt
from joserfc.jwk import RSAKey

from session_close.events import EXPIRED

SESSION_REVOKED = "https://schemas.openid.net/secevent/caep/event-type/session-revoked"
VERIFICATION = "https://schemas.openid.net/secevent/ssf/event-type/verification"
EVENTS_SUPPORTED = (SESSION_REVOKED,)
VERIFICATION_TYPE = "ssf.verification"  # an events row of a verification request
MIN_KEY_BITS = 2048


class SigningKeyError(ValueError):
    """A signing key file that cannot sign SETs; the message names it."""


class Signer:
    """The signing keys: the first signs, every one is in the JWKS."""

    def __init__(self, keys: Sequence[RSAKey]) -> None:
        if not keys:
            raise SigningKeyError("no signing key")
        self._keys = list(keys)
        self._signing = keys[0]
        self._kid = keys[0].thumbprint()

    @classmethod
    def from_files(cls, paths: str) -> Signer:
        """SIGNALS_SIGNING_KEY_FILES: comma-separated PEM files of RSA private keys."""
        keys = []
        for name in (p.strip() for p in paths.split(",") if p.strip()):
            try:
                key = RSAKey.import_key(Path(name).read_bytes())
            except (OSError, ValueError, TypeError) as exc:
                raise SigningKeyError(f"{name}: not an RSA private key in PEM ({exc})") from None
            private = key.private_key
            if not isinstance(private, RSAPrivateKey):
                raise SigningKeyError(f"{name}: not an RSA private key")
            if private.key_size < MIN_KEY_BITS:
                raise SigningKeyError(f"{name}: {private.key_size} bits, fewer than {MIN_KEY_BITS}")
            keys.append(key)
        if not keys:
            raise SigningKeyError("SIGNALS_SIGNING_KEY_FILES names no key file")
        return cls(keys)

    def jwks(self) -> dict[str, Any]:
        return {
            "keys": [
                {
                    **key.as_dict(private=False),
                    "kid": key.thumbprint(),
                    "use": "sig",
                    "alg": "RS256",
                }
                for key in self._keys
            ]
        }

    def sign(self, claims: Mapping[str, Any]) -> str:
        header = {"typ": "secevent+jwt", "alg": "RS256", "kid": self._kid}
        return jwt.encode(header, dict(claims), self._signing)


def write_new_key(path: str, bits: int = 3072) -> bool:
    """A new RSA private key in PEM at `path`, readable by its owner only; False (and
    nothing written) when the file exists."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    return True


def _unix(rfc3339: str) -> int:
    return int(datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp())


def claims(
    *,
    issuer: str,
    audience: str,
    jti: str,
    iat: int,
    event_type: str,
    body: str,
) -> dict[str, Any]:
    """The claims of the SET for one delivery to a stream: `body` is the events row's
    (a session event's CloudEvent, or a verification request's {"state", "streamId"})."""
    event = orjson.loads(body)
    base: dict[str, Any] = {"iss": issuer, "aud": audience, "iat": iat, "jti": jti}
    if event_type == VERIFICATION_TYPE:
        verification = {} if event.get("state") is None else {"state": event["state"]}
        return base | {
            "sub_id": {"format": "opaque", "id": event["streamId"]},
            "events": {VERIFICATION: verification},
        }
    data = event["data"]
    expired = event_type == EXPIRED
    if data.get("requestId"):
        base["txn"] = data["requestId"]
    return base | {
        "sub_id": {
            "format": "complex",
            "user": {"format": "opaque", "id": data["userId"]},
            "session": {"format": "opaque", "id": data["sessionId"]},
        },
        "events": {
            SESSION_REVOKED: {
                # When the session ended: the close, or for an expiry its expires_at.
                "event_timestamp": _unix(
                    data["expiredAt"] if expired and data.get("expiredAt") else data["closedAt"]
                ),
                "initiating_entity": "policy" if expired else "user",
                "reason_admin": {"en": data["reason"]},
            }
        },
    }
