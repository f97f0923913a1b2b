"""What the image is built from cannot change under it: the base image pinned by digest,
and every dependency installed from requirements.lock checked against its hashes."""

from __future__ import annotations

import re

from tests.support.paths import ROOT

DOCKERFILE = ROOT / "deploy" / "Dockerfile"
LOCK = ROOT / "requirements.lock"
_DIGEST = re.compile(r"[a-z0-9./_-]+:[\w.-]+@sha256:[0-9a-f]{64}")


def test_every_base_image_is_pinned_by_digest() -> None:
    text = DOCKERFILE.read_text()
    bases = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    assert len(bases) == 2  # the build and the runtime stage
    for base in bases:
        assert _DIGEST.fullmatch(base), f"FROM {base}: pin it as name:tag@sha256:<digest>"
    assert len(set(bases)) == 1, "both stages build on the same base"
    digest = bases[0].split("@")[1]
    assert f'org.opencontainers.image.base.digest="{digest}"' in text


def requirements() -> dict[str, list[str]]:
    """Each pinned requirement of the lock with its hashes (pip's continued lines)."""
    joined = LOCK.read_text().replace("\\\n", " ")
    found = {}
    for line in joined.splitlines():
        if "==" in line and not line.startswith(("#", " ")):
            pin, *options = line.split()
            found[pin] = [o for o in options if o.startswith("--hash=sha256:")]
    return found


def test_the_image_lock_carries_a_hash_for_every_requirement() -> None:
    found = requirements()
    assert len(found) > 10
    unhashed = [pin for pin, hashes in found.items() if not hashes]
    assert not unhashed, f"requirements.lock without hashes for {unhashed}: run `make lock`"


def test_the_image_installs_the_lock_with_require_hashes() -> None:
    installs = re.findall(r"pip install ([^\\&\n]*)", DOCKERFILE.read_text())
    assert "--require-hashes -r requirements.lock" in [i.strip() for i in installs]
    # the project itself, alone: it is built from the sources copied in, not downloaded
    assert "--no-deps ." in [i.strip() for i in installs]
