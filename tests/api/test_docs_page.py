"""GET /docs in a real browser: Debian's chromium, driven by Playwright (never a browser
Playwright downloads), opens the page of the API started on a free port, waits until
both session operations and their error examples are rendered, and checks that every
request the page made went to the API itself. The screenshot is left in the test's
tmp_path, to look at."""

from __future__ import annotations

import shutil
from pathlib import Path

from playwright.async_api import Request, async_playwright
from redis.asyncio import Redis

from service.docs import CSP
from service.examples import CLOSE_EXCHANGES
from service.openapi import CLOSE_ALL_PATH, CLOSE_PATH
from session_close.settings import Settings
from tests.api.test_http_hygiene import served
from tests.support.tools import needs_tool
from tests.support.waiting import wait_until

CHROMIUM = shutil.which("chromium")
requires_chromium = needs_tool(
    "chromium", CHROMIUM, "make setup as root installs Debian's chromium (no browser download)"
)
# What a headless browser in a container needs, and nothing that phones home.
CHROMIUM_ARGS = [
    "--no-sandbox",  # as root, chromium runs only without its sandbox
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
# Each error status's example that the page shows (the first by name; the others are
# in its list), as its JSON reply reads on the page.
_SHOWN = {e.reply.status: e for e in sorted(CLOSE_EXCHANGES, key=lambda e: e.name, reverse=True)}
ERROR_EXAMPLES = [
    f'"title": "{e.reply_value()["info"]["title"]}"'
    for status, e in _SHOWN.items()
    if status >= 400
]


@requires_chromium
async def test_docs_page_renders_both_operations_and_every_error_example_from_the_api_alone(
    settings: Settings, redis: Redis, amqp_cleanup: None, tmp_path: Path
) -> None:
    assert CHROMIUM is not None
    async with served(settings) as (_, port), async_playwright() as playwright:
        origin = f"http://127.0.0.1:{port}"
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            # The CSP would block a foreign load before it shows as a request: bypass it,
            # so that what the page itself asks for is seen.
            context = await browser.new_context(
                bypass_csp=True, viewport={"width": 1280, "height": 1600}
            )
            page = await context.new_page()
            requested: list[str] = []
            errors: list[str] = []

            def record(request: Request) -> None:
                requested.append(request.url)

            page.on("request", record)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            response = await page.goto(f"{origin}/docs")
            assert response is not None
            assert response.status == 200
            assert response.headers.get("content-security-policy") == CSP

            missing: list[str] = []
            wanted = [CLOSE_PATH, CLOSE_ALL_PATH, "closedSessions", *ERROR_EXAMPLES]

            async def rendered() -> bool:
                text = await page.inner_text("body")
                missing[:] = [w for w in wanted if w not in text]
                return not missing

            try:
                await wait_until(rendered, "both operations and the error examples", within=30)
            except AssertionError as exc:
                raise AssertionError(f"{exc}; missing: {missing}") from None
            await page.screenshot(path=tmp_path / "docs.png")
        finally:
            await browser.close()
    foreign = [url for url in requested if not url.startswith(f"{origin}/")]
    assert foreign == []
    assert f"{origin}/openapi.json" in requested
    assert errors == []
    assert (tmp_path / "docs.png").stat().st_size > 0
