"""The project installs as one shared package beside `service` and `workers`, every
package it imports is declared, and the lock files pin every declared dependency at a
version its floor admits (make lock regenerates them)."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support.paths import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# Import names that differ from their distribution's name.
# opentelemetry is a namespace package: its API's (the SDK and exporter are declared too).
DISTRIBUTIONS = {
    "redis": "redis",
    "aio_pika": "aio-pika",
    "prometheus_client": "prometheus-client",
    "opentelemetry": "opentelemetry-api",
}
# The shared package and a package per process.
OURS = {"session_close", "service", "outbox", "workers", "signals"}


def pins(lock: str) -> dict[str, str]:
    pinned: dict[str, str] = {}
    for line in (ROOT / lock).read_text().splitlines():
        if "==" in line and not line.startswith(("#", " ")):
            name, version = line.split("==")
            pinned[canonicalize_name(name)] = version.split()[0]  # " \" before hashes
    return pinned


def test_the_lock_files_pin_every_declared_dependency_within_its_floor() -> None:
    runtime = [Requirement(r) for r in PYPROJECT["dependencies"]]
    dev = [Requirement(r) for r in PYPROJECT["optional-dependencies"]["dev"]]
    for lock, requirements in (
        ("requirements.lock", runtime),
        ("requirements-dev.lock", runtime + dev),
    ):
        pinned = pins(lock)
        for requirement in requirements:
            version = pinned.get(canonicalize_name(requirement.name))
            assert version is not None, f"{requirement.name} is not in {lock}: run make lock"
            assert requirement.specifier.contains(version, prereleases=True), (lock, requirement)
    # The image's lock has nothing only the tests need.
    assert "pytest" not in pins("requirements.lock")
    assert "honcho" not in pins("requirements.lock")


def imported_distributions() -> set[str]:
    names = set()
    for package in OURS:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names.add(node.module.split(".")[0])
    return {
        canonicalize_name(DISTRIBUTIONS.get(name, name))
        for name in names - OURS - set(sys.stdlib_module_names)
    }


def test_every_package_the_code_imports_is_a_declared_runtime_dependency() -> None:
    declared = {canonicalize_name(Requirement(r).name) for r in PYPROJECT["dependencies"]}
    assert imported_distributions() - declared == set()


def test_pip_install_gives_one_shared_package_beside_a_package_per_process(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), "."],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    [wheel] = tmp_path.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == OURS
    assert "session_close/lua/close_sessions.lua" in names


def test_every_console_script_names_itself_in_its_version() -> None:
    for name in PYPROJECT["scripts"]:
        done = subprocess.run(
            [str(Path(sys.executable).parent / name), "--version"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert done.stdout.split() == [name, PYPROJECT["version"]]
