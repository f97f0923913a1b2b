"""Tests that need a tool from outside Python (npm's redocly, Debian's promtool and
prometheus, hadolint): skipped where the tool is missing on a developer's machine, but
FAILED under CI=true, where `make setup` installs every tool and a missing one means
the setup broke, not that the check may be left out.

    @needs_tool("promtool", PROMTOOL, "make setup as root installs Debian's prometheus")
    def test_...

or, inside a test or fixture, `require_tool(name, path, install)`. The marker is read by
this module's pytest_runtest_setup (tests/conftest.py loads it as a plugin)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

MARKER = "needs_tool"


def missing(name: str, install: str) -> None:
    """Skip the test, or fail it under CI=true: the tool `name` is not installed."""
    message = f"{name} is not installed: {install}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (CI=true: a missing tool fails the run)", pytrace=False)
    pytest.skip(message)


def found(path: str | Path | None) -> bool:
    return path is not None and Path(path).exists()


def require_tool(name: str, path: str | Path | None, install: str) -> None:
    """In a test or fixture: go on only if the tool is at `path`."""
    if not found(path):
        missing(name, install)


def needs_tool(name: str, path: str | Path | None, install: str) -> pytest.MarkDecorator:
    """A marker for a test that needs the tool at `path` (None when not found)."""
    return pytest.mark.needs_tool(name=name, found=found(path), install=install)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{MARKER}(name, found, install): skip, or fail under CI=true, if missing"
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in item.iter_markers(MARKER):
        if not marker.kwargs["found"]:
            missing(marker.kwargs["name"], marker.kwargs["install"])
