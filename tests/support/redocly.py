"""redocly lint, as the people who read the contract documents run it."""

from __future__ import annotations

import subprocess

from tests.support.paths import ROOT
from tests.support.tools import require_tool


def assert_lints_clean(document: str) -> None:
    """`redocly lint <document> --extends recommended` finds no error (warnings allowed)."""
    redocly = ROOT / "node_modules" / ".bin" / "redocly"
    require_tool("redocly", redocly, "make setup installs it with npm (package.json)")
    result = subprocess.run(
        [str(redocly), "lint", document, "--extends", "recommended"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Your API description is valid" in result.stdout + result.stderr
