"""One close sent from Python, as the apps send it (the probes of each run)."""

from __future__ import annotations

import aiohttp

from bench.seed import session_id, token

PATH = "/v1.0/session/close"
BODY = b'{ "requestContent": { } }'


def headers(run_id: str, i: int) -> dict[str, str]:
    return {
        "Content-Type": "application/json; multipart/form-data;",
        "Sessionid": session_id(run_id, i),
        "OS": "Android",
        "AppVersion": "1.0.10",
        "Authorization": f"Basic {token(run_id, i)}",
    }


async def close_one(http: aiohttp.ClientSession, url: str, run_id: str, i: int) -> str:
    """The reply's info.type (success, info, error)."""
    async with http.post(url + PATH, headers=headers(run_id, i), data=BODY) as resp:
        info_type: str = (await resp.json())["info"]["type"]
        return info_type
