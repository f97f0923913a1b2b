"""Every route of the API, in one place."""

from __future__ import annotations

from aiohttp import web

from service.appkeys import METRICS, SETTINGS
from service.docs import docs_asset, docs_init, docs_page
from service.handlers import close_all_sessions, close_session
from service.ops import healthz, openapi, readyz, scrape_handler


def setup_routes(app: web.Application) -> None:
    """Call it once app[METRICS] is set: the session routes' series are created before
    their first request, and /metrics serves that registry."""
    app.router.add_post("/v1.0/session/close", close_session)
    app.router.add_post("/v1.0/session/close-all", close_all_sessions)
    for route in app.router.routes():
        if route.resource is not None:
            app[METRICS].expect_requests(route.resource.canonical, route.method)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if app[SETTINGS].metrics_port is None:
        app.router.add_get("/metrics", scrape_handler(app))
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/docs", docs_page)
    app.router.add_get("/docs/init.js", docs_init)
    app.router.add_get("/docs/{name}", docs_asset)


def metrics_app(app: web.Application) -> web.Application:
    """What METRICS_PORT serves: `app`'s /metrics alone, on a port that the public Service
    does not expose."""
    metrics = web.Application()
    metrics.router.add_get("/metrics", scrape_handler(app))
    return metrics
