"""The Redis keys of docs/redis.md, shared with the login side. One place builds them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

OUTBOX_GROUP = "relay"
# What a dead letter adds to the outbox entry's own fields (which `sessionctl outbox
# replay` writes back): why it was set aside, the field at fault, the entry's old id.
DEAD_LETTER_REASON = "dead_letter_reason"
DEAD_LETTER_FIELD = "dead_letter_field"
DEAD_LETTER_ENTRY_ID = "dead_letter_entry_id"
DEAD_LETTER_FIELDS = (DEAD_LETTER_REASON, DEAD_LETTER_FIELD, DEAD_LETTER_ENTRY_ID)


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

    @property
    def write_check(self) -> str:
        """Never holds data: /readyz deletes it to learn whether Redis takes writes."""
        return f"{self.prefix}readyz:write-check"

    @property
    def dead_letters(self) -> str:
        """Outbox entries that can never become a valid event, set aside by the relay
        with the reason (docs/operations.md: sessionctl outbox dead-letters / replay)."""
        return f"{self.prefix}outbox:dead-letters"

    def relay_heartbeat(self, consumer: str) -> str:
        """Refreshed by a live outbox relay; gone (expired) once the relay is dead."""
        return f"{self.prefix}outbox:relay:{consumer}"
