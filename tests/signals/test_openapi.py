"""The transmitter's own OpenAPI document: generated from the schemas its endpoints
validate with, lint-clean, and naming exactly the routes it serves."""

from __future__ import annotations

import json
from typing import Any, cast

from aiohttp import web

from signals.openapi import spec_json
from signals.ssf import SsfApi
from tests.support.paths import ROOT
from tests.support.redocly import assert_lints_clean

DOCUMENT = "docs/signals-openapi.json"
# Served beside the SSF endpoints by signals/app.py.
PROBES = {("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics")}


def test_docs_signals_openapi_json_is_what_the_code_generates() -> None:
    """`python -m signals.openapi > docs/signals-openapi.json` regenerates it (make docs)."""
    assert (ROOT / DOCUMENT).read_bytes() == spec_json()


def test_redocly_lint_with_the_recommended_rules_reports_no_error() -> None:
    assert_lints_clean(DOCUMENT)


def test_the_document_names_exactly_the_routes_the_transmitter_serves() -> None:
    app = web.Application()
    unused = cast(Any, None)
    SsfApi(unused, unused, unused, issuer="https://signals.example", allow_http=False).routes(app)
    served = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    } | PROBES
    document = json.loads((ROOT / DOCUMENT).read_text())
    documented = {
        (method.upper(), path) for path, item in document["paths"].items() for method in item
    }
    assert documented == served
    operations = [op for item in document["paths"].values() for op in item.values()]
    assert len({op["operationId"] for op in operations}) == len(operations)
