"""The examples of the OpenAPI document are what the API does: every session endpoint
documents a request and a reply example for every status it answers, and each example's
request, sent to the real app with Redis holding what the example says, gets exactly
the documented reply (500 and 503 need a bug or Redis away: their replies are checked
against the handlers' own messages by the document test only)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from service.examples import CLOSE_ALL_EXCHANGES, CLOSE_EXCHANGES, SESSION_ID, TOKEN, Exchange
from service.openapi import CLOSE_ALL_PATH, CLOSE_PATH, build_spec
from session_close.cli import create_session, create_token
from session_close.keys import Keys

Client = TestClient[web.Request, web.Application]

EXAMPLES = [(CLOSE_PATH, e) for e in CLOSE_EXCHANGES] + [
    (CLOSE_ALL_PATH, e) for e in CLOSE_ALL_EXCHANGES
]
# What Redis holds before an example's request: the token (of user u-example) and the
# user's open sessions.
WITH_TOKEN = {"closed", "already_closed", "sessions_closed", "no_sessions_to_close"}
WITH_TOKEN |= {"session_not_found"}
OPEN_SESSIONS = {
    "closed": [SESSION_ID],
    "already_closed": [SESSION_ID],
    "sessions_closed": [SESSION_ID, "example-other-1", "example-other-2"],
}
NOT_REPRODUCED = {500, 503}
REPRODUCED = [(p, e) for p, e in EXAMPLES if e.reply.status not in NOT_REPRODUCED]


def test_every_status_of_both_endpoints_has_a_request_and_a_reply_example() -> None:
    document = build_spec()
    for path in (CLOSE_PATH, CLOSE_ALL_PATH):
        post = document["paths"][path]["post"]
        requests = post["requestBody"]["content"]["application/json"]["examples"]
        replies: dict[int, list[dict[str, Any]]] = {
            int(status): list(response["content"]["application/json"]["examples"].values())
            for status, response in post["responses"].items()
        }
        # the error table (docs/http-api.md): 200 success and info, 400 ... 503
        assert {200, 400, 401, 404, 405, 413, 415, 500, 503} == replies.keys(), path
        assert {e["value"]["info"]["type"] for e in replies[200]} == {"success", "info"}
        for status, examples in replies.items():
            for example in examples:
                # the reply's example shows the request that gets it
                assert f" {path}\n" in example["description"], (path, status)
        # every POST request as a request body example, with its headers
        assert len(requests) == sum(len(e) for s, e in replies.items() if s != 405)
        assert all("Content-Type: " in r["description"] for r in requests.values())


def _body(exchange: Exchange) -> bytes | None:
    if exchange.body is None:
        return None
    body: dict[str, Any] = exchange.body
    if exchange.padding:
        content = body["requestContent"] | {"padding": "x" * exchange.padding}
        body = body | {"requestContent": content}
    return orjson.dumps(body)


@pytest.mark.parametrize(
    ("path", "exchange"),
    [
        pytest.param(p, e, id=f"{p}-{e.name}")
        for p, e in EXAMPLES
        if e.reply.status not in NOT_REPRODUCED
    ],
)
async def test_each_documented_request_gets_the_documented_reply(
    client: Client, redis: Redis, keys: Keys, path: str, exchange: Exchange
) -> None:
    if exchange.name in WITH_TOKEN:
        await create_token(redis, keys, "u-example", TOKEN, 300)
    for sid in OPEN_SESSIONS.get(exchange.name, []):
        await create_session(redis, keys, "u-example", sid, ttl=300)

    async def send() -> tuple[int, Any]:
        response = await client.request(
            exchange.method, path, headers=dict(exchange.headers), data=_body(exchange)
        )
        return response.status, await response.json()

    if exchange.name == "already_closed":
        assert (await send())[0] == 200  # the first close
    status, reply = await send()
    assert (status, reply) == (exchange.reply.status, exchange.reply_value())
