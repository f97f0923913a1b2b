"""The ceiling: a bare aiohttp endpoint on uvloop that reads the body and returns a fixed
info object, with none of the service's validation, Redis or relay.

Run as `python -m bench.bare PORT`.
"""

from __future__ import annotations

import json
import sys

import uvloop
from aiohttp import web

INFO = json.dumps(
    {
        "info": {
            "type": "success",
            "title": "Session closed!",
            "message": "The session has been closed successfully!",
            "sessionId": "",
        }
    }
).encode()


async def close(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=INFO, content_type="application/json")


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/v1.0/session/close", close)
    return app


def main() -> None:
    port = int(sys.argv[1])
    web.run_app(
        create_app(),
        host="127.0.0.1",
        port=port,
        print=None,
        access_log=None,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
