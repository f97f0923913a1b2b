"""/openapi.json: a valid OpenAPI 3 document made from the schemas that validate, the same
document as docs/openapi.json, clean under redocly's recommended rules, usable by a client
generator, and a bounded schemathesis run against the live API that finds no 5xx and no
reply outside it."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import schemathesis
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, Phase
from marshmallow import Schema
from openapi_spec_validator import validate
from redis.asyncio import Redis
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.result import Ok
from schemathesis.generation import GenerationMode

from service.openapi import CLOSE_ALL_PATH, CLOSE_PATH, build_spec, spec_json
from service.schemas import (
    CloseAllHeadersSchema,
    CloseBodySchema,
    CloseHeadersSchema,
    InfoSchema,
)
from session_close.cli import create_session, create_token
from session_close.keys import Keys
from session_close.settings import Settings
from tests.support.paths import ROOT
from tests.support.processes import listening_port, running, settings_env
from tests.support.redocly import assert_lints_clean

Client = TestClient[web.Request, web.Application]

# The error table: every status the session endpoints answer with.
SESSION_STATUSES = {200, 400, 401, 404, 405, 413, 415, 500, 503}


@pytest.fixture
def document() -> dict[str, Any]:
    return build_spec()


def close_parameters(document: dict[str, Any], path: str = CLOSE_PATH) -> dict[str, dict[str, Any]]:
    post = document["paths"][path]["post"]
    return {p["name"]: p for p in post["parameters"] if p["in"] == "header"}


def test_document_is_valid_openapi_3(document: dict[str, Any]) -> None:
    validate(document)  # raises on any violation
    assert document["openapi"].startswith("3.")


def test_header_parameters_come_from_the_validating_schemas(document: dict[str, Any]) -> None:
    schema: Schema
    for path, schema in (
        (CLOSE_PATH, CloseHeadersSchema()),
        (CLOSE_ALL_PATH, CloseAllHeadersSchema()),
    ):
        parameters = close_parameters(document, path)
        for name, field in schema.fields.items():
            assert parameters[name]["required"] is field.required, name
        assert {"Accept-Language", "X-Request-ID", "traceparent"} <= parameters.keys()
        # OpenAPI ignores header parameters named Authorization or Content-Type: the
        # token is a security scheme, the content type the request body's.
        assert not {"Authorization", "Content-Type"} & parameters.keys()
        assert parameters["OS"]["schema"]["maxLength"] == 64
    assert close_parameters(document, CLOSE_ALL_PATH)["SessionID"]["required"] is False


def test_the_access_token_is_a_basic_or_bearer_security_scheme(document: dict[str, Any]) -> None:
    schemes = document["components"]["securitySchemes"]
    assert schemes["basicAuth"] == {**schemes["basicAuth"], "type": "http", "scheme": "basic"}
    assert schemes["bearerAuth"] == {**schemes["bearerAuth"], "type": "http", "scheme": "bearer"}
    for path in (CLOSE_PATH, CLOSE_ALL_PATH):
        assert document["paths"][path]["post"]["security"] == [
            {"basicAuth": []},
            {"bearerAuth": []},
        ]
    assert document["paths"]["/healthz"]["get"]["security"] == []


def test_every_operation_has_an_id_a_tag_and_the_document_its_servers_and_license(
    document: dict[str, Any],
) -> None:
    operations = [op for item in document["paths"].values() for op in item.values()]
    ids = [op["operationId"] for op in operations]
    assert len(ids) == len(set(ids)) == len(operations)
    assert all(op["tags"] for op in operations)
    assert {t["name"] for t in document["tags"]} == {t for op in operations for t in op["tags"]}
    assert document["servers"]
    assert document["info"]["license"]["name"]


def test_the_served_document_is_docs_openapi_json() -> None:
    """`python -m service.openapi > docs/openapi.json` regenerates it (make docs)."""
    assert (ROOT / "docs" / "openapi.json").read_bytes() == spec_json()


def test_redocly_lint_with_the_recommended_rules_reports_no_error() -> None:
    assert_lints_clean("docs/openapi.json")


def test_body_and_info_schemas_come_from_the_validating_schemas(
    document: dict[str, Any],
) -> None:
    schemas = document["components"]["schemas"]
    body = document["paths"][CLOSE_PATH]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/CloseBody"
    }
    assert schemas["CloseBody"]["properties"].keys() == CloseBodySchema().fields.keys()
    assert schemas["CloseBody"]["required"] == ["requestContent"]
    assert schemas["Info"]["properties"].keys() == InfoSchema().fields.keys()
    assert set(schemas["Info"]["required"]) == {"type", "title", "message", "sessionId"}
    assert schemas["Info"]["properties"]["type"]["enum"] == ["success", "warning", "error", "info"]


def test_every_reply_status_of_the_spec_is_documented_with_the_info_object(
    document: dict[str, Any],
) -> None:
    for path in (CLOSE_PATH, CLOSE_ALL_PATH):
        responses = document["paths"][path]["post"]["responses"]
        assert {int(status) for status in responses} == SESSION_STATUSES
        for status, response in responses.items():
            schema = response["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/InfoReply"}, status
            assert response["headers"]["X-Request-ID"]["required"] is True
        assert "WWW-Authenticate" in responses["401"]["headers"]
        assert "Retry-After" in responses["503"]["headers"]
    assert (
        "Sessions closed!"
        in document["paths"][CLOSE_ALL_PATH]["post"]["responses"]["200"]["description"]
    )
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert "200" in document["paths"][path]["get"]["responses"], path
    assert {"200", "503"} <= document["paths"]["/readyz"]["get"]["responses"].keys()


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("SessionID", "abcdefgh"),
        ("SessionID", "a.b_c-d.0123456789"),
        ("SessionID", "short"),
        ("SessionID", "!!!!abcdefgh"),
        ("SessionID", "abcdefgh!!!!"),
        ("SessionID", "abcdefgh\n"),
        ("SessionID", "Zabcdefgh"),
        ("AppVersion", "1.0.10"),
        ("AppVersion", "2.0.0-rc.1+build.5"),
        ("AppVersion", "1.0"),
        ("AppVersion", "v1.0.0"),
        ("AppVersion", "01.0.0"),
    ],
)
def test_documented_patterns_accept_exactly_what_the_server_accepts(
    document: dict[str, Any], header: str, value: str
) -> None:
    # JSON Schema patterns search anywhere (ECMA 262 dialect); the document must anchor
    # them as marshmallow does. Python's `re` reads these translated patterns the same way.
    pattern = close_parameters(document)[header]["schema"]["pattern"]
    documented = re.search(pattern.replace("$", r"\Z"), value) is not None
    accepted = header not in CloseHeadersSchema().validate({header: value})
    assert documented is accepted


async def test_openapi_json_is_served(client: Client, document: dict[str, Any]) -> None:
    resp = await client.get("/openapi.json")
    assert resp.status == 200
    assert resp.content_type == "application/json"
    assert await resp.json() == document


TOKEN = "schemathesis-token"
SESSION_ID = "schemathesis-session-1"


@pytest.fixture
async def known_session(redis: Redis, keys: Keys) -> None:
    await create_token(redis, keys, "u-schemathesis", TOKEN, 300)
    await create_session(redis, keys, "u-schemathesis", SESSION_ID, ttl=300)


@pytest.fixture
def live_api(
    settings: Settings,
    redis: Redis,
    amqp_cleanup: None,
    known_session: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[str]:
    """`python -m service` on a port of 127.0.0.1 it chose itself (schemathesis calls it
    with a blocking HTTP client, which would stall an in-process server on this loop)."""
    # schemathesis keeps its state in ./.schemathesis: in the test's directory, not the
    # repository's
    monkeypatch.chdir(tmp_path)
    log = tmp_path / "api.log"
    env = settings_env(settings, HTTP_HOST="127.0.0.1", HTTP_PORT="0", LOG_LEVEL="INFO")
    with running(["service"], env, log) as proc:
        port = listening_port(log, proc)
        yield f"http://127.0.0.1:{port}"
        proc.terminate()
        proc.wait(15)


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.mark.fault
def test_schemathesis_finds_no_server_error_and_no_reply_outside_the_document(
    live_api: str, report_counts: Callable[..., None]
) -> None:
    with urllib.request.urlopen(f"{live_api}/openapi.json", timeout=5) as resp:
        assert resp.status == 200
    schema = schemathesis.openapi.from_url(f"{live_api}/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations() if isinstance(r, Ok)]
    # schemathesis leaves out the document's own URL
    session_paths = {CLOSE_PATH, CLOSE_ALL_PATH}
    assert {op.path for op in operations} == session_paths | {"/healthz", "/readyz", "/metrics"}
    # The session endpoints also run with a known token (deeper: 400s, 404 for unknown
    # sessions) and with a known token and open session (200 success, then 200 info).
    known = [
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Basic {TOKEN}", "SessionID": SESSION_ID},
    ]
    passes: list[tuple[Any, GenerationMode, dict[str, str] | None]] = []
    for operation in operations:
        passes.append((operation, GenerationMode.POSITIVE, None))
        if operation.path in session_paths:
            # the operational GETs take no input, so there is nothing to make invalid
            passes.append((operation, GenerationMode.NEGATIVE, None))
            passes.append((operation, GenerationMode.NEGATIVE, known[0]))
            passes += [(operation, GenerationMode.POSITIVE, headers) for headers in known]
    statuses: Counter[int] = Counter()

    def fuzz(operation: Any, mode: GenerationMode, headers: dict[str, str] | None) -> None:
        @hypothesis.settings(
            max_examples=50,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
        def run(case: Any) -> None:
            response = case.call_and_validate(base_url=live_api, headers=headers, checks=CHECKS)
            statuses[response.status_code] += 1

        run()

    for operation, mode, headers in passes:
        fuzz(operation, mode, headers)
    server_errors = sum(n for status, n in statuses.items() if status >= 500)
    report_counts(
        requests=statuses.total(),
        server_errors=server_errors,
        **{f"status_{status}": n for status, n in sorted(statuses.items())},
    )
    # the run reached every kind of reply the session endpoints give to a client
    # (415 is left to test_close_request_checks: the document gives the body one media type, so
    # schemathesis sends no other)
    assert {200, 400, 401, 404} <= statuses.keys(), statuses
    assert statuses.total() >= 150
    assert server_errors == 0


def test_a_client_generated_from_the_document_closes_a_session(
    live_api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What an app team would do: generate a client with openapi-python-client from
    docs/openapi.json, authenticate with the access token, close the session."""
    package = tmp_path / "session_close_client"
    generator = Path(sys.executable).parent / "openapi-python-client"
    document = ROOT / "docs" / "openapi.json"
    result = subprocess.run(
        [
            str(generator),
            "generate",
            "--meta",
            "none",
            "--path",
            str(document),
            "--output-path",
            str(package),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        # its post-generation hooks run ruff from PATH
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    monkeypatch.syspath_prepend(str(tmp_path))
    client_module = importlib.import_module("session_close_client")
    close_session = importlib.import_module("session_close_client.api.sessions.close_session")
    close_all = importlib.import_module("session_close_client.api.sessions.close_all_sessions")
    models = importlib.import_module("session_close_client.models")

    client = client_module.AuthenticatedClient(base_url=live_api, token=TOKEN, prefix="Basic")
    with client:
        closed = close_session.sync_detailed(
            client=client,
            body=models.CloseBody(request_content=models.CloseBodyRequestContent()),
            session_id=SESSION_ID,
            os="Android",
            app_version="1.0.10",
        )
        assert closed.status_code == 200
        assert closed.parsed.info.type_ == models.InfoType.SUCCESS
        assert closed.parsed.info.session_id == SESSION_ID
        again = close_session.sync_detailed(
            client=client,
            body=models.CloseBody(request_content=models.CloseBodyRequestContent()),
            session_id=SESSION_ID,
        )
        assert again.parsed.info.type_ == models.InfoType.INFO
        nothing_left = close_all.sync_detailed(
            client=client, body=models.CloseAllBody(request_content=models.CloseAllContent())
        )
        assert nothing_left.status_code == 200
        assert nothing_left.parsed.info.closed_sessions == 0
