"""The Redis keys of docs/redis.md, shared with the login side. One place builds them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

OUTBOX_GROUP = "relay"


def token_digest(token: str) -> str:
    """Tokens are never stored in clear: the login side keys them by SHA-256 hex."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = ""

    def token(self, token: str) -> str:
        return f"{self.prefix}auth:token:{token_digest(token)}"

    def session(self, sid: str) -> str:
        return f"{self.prefix}session:{sid}"

    def user_sessions(self, uid: str) -> str:
        return f"{self.prefix}user:{uid}:sessions"

    def user_push(self, uid: str) -> str:
        return f"{self.prefix}user:{uid}:push"

    def tombstone(self, sid: str) -> str:
        return f"{self.prefix}session:closed:{sid}"

    def close_all(self, uid: str, run: str) -> str:
        """A close-all's running count of sessions closed (close_all_sessions.lua)."""
        return f"{self.prefix}user:{uid}:close-all:{run}"

    @property
    def expiry(self) -> str:
        """The expiry index: sid -> the session's expires_at (Unix seconds)."""
        return f"{self.prefix}sessions:expiry"

    @property
    def outbox(self) -> str:
        return f"{self.prefix}outbox:session.closed"

    def relay_heartbeat(self, consumer: str) -> str:
        """Refreshed by a live outbox relay; gone (expired) once the relay is dead."""
        return f"{self.prefix}outbox:relay:{consumer}"
