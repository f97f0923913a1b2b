"""METRICS_PORT: /metrics on a port of its own, and then not on the public port."""

from __future__ import annotations

import dataclasses
import logging

import aiohttp
import pytest
from aiohttp.pytest_plugin import AiohttpClient

from service.app import create_app
from session_close.settings import Settings
from tests.support.closing import Client


async def test_with_metrics_port_set_metrics_is_served_there_and_404_on_the_public_port(
    aiohttp_client: AiohttpClient,
    settings: Settings,
    amqp_cleanup: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="service.app")
    own = dataclasses.replace(settings, http_host="127.0.0.1", metrics_port=0)
    client: Client = await aiohttp_client(create_app(own))
    try:
        [line] = [r for r in caplog.records if r.getMessage() == "serving metrics"]
        port = line.__dict__["port"]
        public = await client.get("/metrics")
        assert public.status == 404
        assert (await public.json())["info"]["type"] == "error"
        assert (await client.get("/readyz")).status == 200  # the rest stays public
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/metrics") as scraped:
                assert scraped.status == 200
                assert scraped.headers["Content-Type"].startswith("text/plain")
                assert "redis_writes_up 1.0" in await scraped.text()
            async with session.get(f"http://127.0.0.1:{port}/readyz") as other:
                assert other.status == 404  # the metrics port serves /metrics only
    finally:
        await client.close()


async def test_without_metrics_port_metrics_stays_on_the_api_port(client: Client) -> None:
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert "redis_writes_up" in await resp.text()
