"""A tool the tests need and cannot find (tests/support/tools.py) skips their tests on a
developer's machine and fails them under CI=true, as CI runs; so does `make setup`'s
npm step. Each check runs in a subprocess with a tool that does not exist."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import ROOT

TOOL = "no-such-tool-for-the-test"
NEEDS_IT = f"""
from tests.support.tools import needs_tool, require_tool

@needs_tool("{TOOL}", None, "make setup installs it")
def test_marked() -> None:
    pass

def test_required() -> None:
    require_tool("{TOOL}", "/nonexistent/{TOOL}", "make setup installs it")
"""


def environment(ci: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    return env | {"PYTHONPATH": str(ROOT)} | ({"CI": "true"} if ci else {})


def pytest_on_a_test_that_needs_a_missing_tool(tmp_path: Path, ci: bool) -> tuple[int, str]:
    (tmp_path / "test_needs_it.py").write_text(NEEDS_IT)
    # only the helper as a plugin: the repository's conftest is not loaded here
    plugins = ("-p", "no:cacheprovider", "-p", "tests.support.tools")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rfEs", *plugins, "test_needs_it.py"],
        cwd=tmp_path,
        env=environment(ci),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


def test_a_missing_tool_fails_its_tests_under_ci_true(tmp_path: Path) -> None:
    returncode, output = pytest_on_a_test_that_needs_a_missing_tool(tmp_path, ci=True)
    assert returncode == 1, output
    why = f"Failed: {TOOL} is not installed: make setup installs it (CI=true"
    assert f"ERROR test_needs_it.py::test_marked - {why}" in output, output  # in setup
    assert f"FAILED test_needs_it.py::test_required - {why}" in output, output
    assert "1 failed, 1 error" in output, output


def test_a_missing_tool_skips_its_tests_without_ci(tmp_path: Path) -> None:
    returncode, output = pytest_on_a_test_that_needs_a_missing_tool(tmp_path, ci=False)
    assert returncode == 0, output
    assert f": {TOOL} is not installed: make setup installs it\n" in output, output
    assert "2 skipped" in output, output


@pytest.mark.parametrize("ci", [True, False], ids=["ci", "local"])
def test_make_setup_without_npm_fails_under_ci_true_and_goes_on_locally(
    tmp_path: Path, ci: bool
) -> None:
    make = shutil.which("make")
    assert make is not None
    env = environment(ci) | {"PATH": str(tmp_path)}  # an empty directory: no npm
    env = {k: v for k, v in env.items() if k not in ("MAKEFLAGS", "MAKELEVEL")}
    done = subprocess.run(
        # -B: the npm step runs even where node_modules is up to date
        [make, "-B", "-C", str(ROOT), f"PYTHON={sys.executable}", "node_modules/.installed"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode != 0) is ci, done.stdout + done.stderr
    assert "npm is missing" in done.stderr
