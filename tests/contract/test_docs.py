"""The repository documents itself: every relative link in its Markdown files resolves in
a fresh clone, and no file points outside the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.support.paths import ROOT

# [text](target) and [text]: target, skipping images' and code spans' look-alikes.
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)|^\[[^\]]+\]:\s*(\S+)", re.MULTILINE)
_CODE = re.compile(r"```.*?```|`[^`\n]*`", re.DOTALL)


def tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    return [ROOT / line for line in out.splitlines()]


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    return {
        re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        for heading in re.findall(r"^#+ (.+)$", _CODE.sub("", markdown), re.MULTILINE)
    }


MARKDOWN = tracked("*.md")
# The folder beside the repository that a clone does not have (spelt in two parts, so
# that this file does not match itself).
OUTSIDE = "../" + "shared"


def test_there_are_markdown_files_to_check() -> None:
    assert ROOT / "README.md" in MARKDOWN
    assert any(path.parent.name == "docs" for path in MARKDOWN)


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_inside_the_repository(path: Path) -> None:
    text = _CODE.sub("", path.read_text())
    broken = []
    for match in _LINK.finditer(text):
        target = match.group(1) or match.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        found = resolved.is_relative_to(ROOT) and resolved.exists()
        if found and anchor and resolved.suffix == ".md":
            found = anchor in anchors(resolved.read_text())
        if not found:
            broken.append(target)
    assert broken == []


def test_no_tracked_file_points_outside_the_repository() -> None:
    this = Path(__file__).resolve()
    offenders = []
    for path in tracked():
        if path == this or not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if OUTSIDE in line or re.search(r"\bSPEC\b", line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:80]}")
    assert offenders == []
