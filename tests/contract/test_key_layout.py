"""docs/redis.md states key layout 2 for the login side: its reference function and its
example of every key are the keys this service builds (session_close/keys.py)."""

from __future__ import annotations

import re
import zlib

import pytest

from session_close.keys import BUCKETS, Keys, bucket_of
from session_close.settings import Settings, SettingsError
from tests.support.paths import ROOT

DOC = (ROOT / "docs" / "redis.md").read_text()


def code_blocks(language: str) -> list[str]:
    """The fenced blocks of the page in that language ("" for none given)."""
    fenced = re.findall(r"^```(\w*)\n(.*?)^```", DOC, re.DOTALL | re.MULTILINE)
    return [body for lang, body in fenced if lang == language]


def test_the_reference_function_gives_the_tag_the_service_builds() -> None:
    [reference] = [block for block in code_blocks("python") if "def bucket_tag" in block]
    namespace: dict[str, object] = {}
    exec(reference, namespace)  # the documented function, as the login side would copy it
    bucket_tag = namespace["bucket_tag"]
    assert callable(bucket_tag)
    for user in ["42", "user-1", "ünïcode-user", "", "a" * 300]:
        for prefix in ["", "app:"]:
            assert bucket_tag(user, prefix) == Keys(prefix).tag(bucket_of(user))


def test_the_bucket_is_crc32_mod_256_for_ever() -> None:
    assert BUCKETS == 256
    assert bucket_of("42") == zlib.crc32(b"42") % 256 == 136


def test_the_example_of_every_key_is_what_the_service_writes() -> None:
    [example] = [block for block in code_blocks("") if "auth:token:" in block]
    keys, user, sid = Keys(), "42", "3f2a9c1e"
    bucket = bucket_of(user)
    built = {
        keys.token("test"),
        keys.session(user, sid),
        keys.user_sessions(user),
        keys.user_push(user),
        keys.expiry(bucket),
        keys.tombstone(user, sid),
        keys.outbox(bucket),
        keys.dead_letters,
        keys.write_check,
    }
    shown = set(example.split())
    assert built <= shown
    close_all = [k for k in shown if ":close-all:" in k]
    assert len(close_all) == 1
    assert close_all[0].startswith(keys.close_all(user, ""))
    heartbeat = [k for k in shown if k.startswith(keys.relay_heartbeat(""))]
    assert heartbeat


@pytest.mark.parametrize("prefix", ["a{b", "}", "{x}"])
def test_the_prefix_holds_no_braces(prefix: str) -> None:
    """A brace in the prefix would move the hash tag: the settings refuse it."""
    with pytest.raises(SettingsError, match=r"REDIS_KEY_PREFIX=.*must not hold a brace"):
        Settings.from_env({"REDIS_KEY_PREFIX": prefix})
