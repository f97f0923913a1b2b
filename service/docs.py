"""GET /docs: the API reference for app developers, Swagger UI rendering /openapi.json.

Every file the page loads is served here, from the swagger-ui-bundle package (a PyPI
wheel holding Swagger UI's built files, so it is in the image and in every virtual
environment without npm): no CDN, no font, no image from elsewhere. The page uses
Swagger UI's base layout (no top bar with its logo, no validator badge, which would send
the document to an outside service), and its Content-Security-Policy tells the browser
to load nothing from another origin anyway.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web
from swagger_ui_bundle import swagger_ui_path

# The only files of the bundle the page needs; nothing else of its folder is served.
ASSETS = ("swagger-ui.css", "swagger-ui-bundle.js", "favicon-32x32.png")
# Relative URLs: the page works behind a proxy that mounts the API under a prefix.
PAGE = b"""<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>eliab session close service: API reference</title>
  <link rel="stylesheet" href="docs/swagger-ui.css">
  <link rel="icon" type="image/png" href="docs/favicon-32x32.png">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="docs/swagger-ui-bundle.js"></script>
  <script src="docs/init.js"></script>
</body>
</html>
"""
# In a file of its own rather than inline, so the CSP can forbid inline scripts.
# docExpansion full: every operation open, its request and reply examples on the page.
# validatorUrl null: the base layout draws no validator badge, and should a layout that
# does ever be used, it still sends the document to no outside validator.
INIT = b"""window.onload = function () {
  window.ui = SwaggerUIBundle({
    url: "openapi.json",
    dom_id: "#swagger-ui",
    layout: "BaseLayout",
    presets: [SwaggerUIBundle.presets.apis],
    docExpansion: "full",
    defaultModelsExpandDepth: 0,
    validatorUrl: null
  });
};
"""
# Swagger UI sets inline styles and draws its icons as data: URLs.
CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"}


async def docs_page(request: web.Request) -> web.Response:
    return web.Response(body=PAGE, content_type="text/html", charset="utf-8", headers=_HEADERS)


async def docs_init(request: web.Request) -> web.Response:
    return web.Response(body=INIT, content_type="text/javascript", headers=_HEADERS)


async def docs_asset(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in ASSETS:
        raise web.HTTPNotFound()
    # FileResponse: the content type from the name, ETag and Last-Modified, sendfile.
    return web.FileResponse(Path(str(swagger_ui_path)) / name, headers=_HEADERS)
