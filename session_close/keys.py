"""The Redis keys of docs/redis.md, shared with the login side. One place builds them.

Layout version 2, the same on a single node, behind Sentinel and on Redis Cluster. Every
key of a user carries the hash tag of the user's bucket, `{b<n>}` with
n = CRC32(user id, UTF-8) mod 256, and the outbox and the expiry index are sharded over
the same 256 buckets: a user's keys, and the outbox and index entries their closes and
sweeps write, all sit in one hash slot, so one script can declare them all. The token's
key has no tag (its own slot): it is looked up first, and names the user.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass

# Fixed by the contract forever: the login side and every stored key depend on it.
BUCKETS = 256
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


def bucket_of(user_id: str) -> int:
    """The user's bucket: CRC32 (zlib's, ISO-HDLC) of the UTF-8 user id, mod BUCKETS."""
    return zlib.crc32(user_id.encode()) % BUCKETS


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = ""

    def tag(self, bucket: int) -> str:
        """What every key of the bucket starts with: the prefix, then the hash tag."""
        return f"{self.prefix}{{b{bucket}}}:"

    def token(self, token: str) -> str:
        return f"{self.prefix}auth:token:{token_digest(token)}"

    def session(self, uid: str, sid: str) -> str:
        return f"{self.tag(bucket_of(uid))}session:{sid}"

    def user_sessions(self, uid: str) -> str:
        return f"{self.tag(bucket_of(uid))}user:{uid}:sessions"

    def user_push(self, uid: str) -> str:
        return f"{self.tag(bucket_of(uid))}user:{uid}:push"

    def tombstone(self, uid: str, sid: str) -> str:
        return f"{self.tag(bucket_of(uid))}session:closed:{sid}"

    def close_all(self, uid: str, run: str) -> str:
        """A close-all's running count of sessions closed (close_all_sessions.lua)."""
        return f"{self.tag(bucket_of(uid))}user:{uid}:close-all:{run}"

    def expiry(self, bucket: int) -> str:
        """A bucket's expiry index: sid -> the session's expires_at (Unix seconds)."""
        return f"{self.tag(bucket)}sessions:expiry"

    def outbox(self, bucket: int) -> str:
        return f"{self.tag(bucket)}outbox:session.closed"

    @property
    def outboxes(self) -> list[str]:
        """Every bucket's outbox, in bucket order."""
        return [self.outbox(bucket) for bucket in range(BUCKETS)]

    @property
    def write_check(self) -> str:
        """Never holds data: /readyz deletes it to learn whether Redis takes writes."""
        return f"{self.prefix}readyz:write-check"

    @property
    def dead_letters(self) -> str:
        """Outbox entries that can never become a valid event, set aside by the relay
        with the reason (docs/operations.md: sessionctl outbox dead-letters / replay).
        One stream for every bucket, in a slot of its own."""
        return f"{self.prefix}outbox:dead-letters"

    def relay_heartbeat(self, consumer: str) -> str:
        """Refreshed by a live outbox relay; gone (expired) once the relay is dead."""
        return f"{self.prefix}outbox:relay:{consumer}"
