"""The examples of the OpenAPI document: for every status of the two session endpoints,
a request and the reply it gets, so that an app developer reading /docs sees each case
of the error table as it happens on the wire. The replies are built from the same
messages the handlers answer with (service/replies.py), and a test sends each request to
the running API and compares (tests/api/test_openapi_examples.py)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from service.replies import MESSAGES, Reply
from service.schemas import MAX_BODY_BYTES, session_id_or_empty

TOKEN = "k7Q2mX9vR4tL8wZ1"
SESSION_ID = "3f9a2c1e-5b7d-4e8f-a1c3-9d2e7b6f0a14"
# As the apps send them (docs/http-api.md), the token's user owning the session.
APP_HEADERS: Mapping[str, str] = {
    "Content-Type": "application/json; multipart/form-data;",
    "Sessionid": SESSION_ID,
    "OS": "Android",
    "AppVersion": "1.0.10",
    "Authorization": f"Basic {TOKEN}",
}


def _without(*names: str, **replaced: str) -> dict[str, str]:
    headers = {k: v for k, v in APP_HEADERS.items() if k not in names}
    return headers | {k.replace("_", "-"): v for k, v in replaced.items()}


@dataclass(frozen=True, slots=True)
class Exchange:
    """One request and the reply it gets; `given` says what Redis holds beforehand."""

    reply: Reply
    given: str
    headers: Mapping[str, str] = field(default_factory=lambda: dict(APP_HEADERS))
    body: Any = field(default_factory=lambda: {"requestContent": {}})
    method: str = "POST"
    # Characters of padding inside requestContent that take the body past the limit; the
    # document shows the body without them.
    padding: int = 0
    errors: dict[str, list[str]] | None = None
    closed_sessions: int | None = None

    @property
    def name(self) -> str:
        return str(self.reply.value[0])

    def summary(self) -> str:
        title = MESSAGES[self.reply]["en"][0]
        return f"{self.reply.status} {self.reply.info_type}: {title}"

    def describe(self, path: str) -> str:
        """What holds beforehand and the request, in Markdown."""
        lines = [f"{self.method} {path}", *(f"{k}: {v}" for k, v in self.headers.items())]
        if self.body is not None:
            lines += ["", orjson.dumps(self.body).decode()]
        text = f"{self.given}\n\n```http\n" + "\n".join(lines) + "\n```"
        if self.padding:
            text += f"\n\nwith a `padding` field of {self.padding} characters in `requestContent`."
        return text

    def request_example(self, path: str) -> dict[str, Any]:
        return {"summary": self.summary(), "description": self.describe(path), "value": self.body}

    def reply_value(self) -> dict[str, Any]:
        title, message = MESSAGES[self.reply]["en"]
        sid = next((v for k, v in self.headers.items() if k.lower() == "sessionid"), None)
        info: dict[str, Any] = {
            "type": self.reply.info_type,
            "title": title,
            "message": message,
            "sessionId": session_id_or_empty(sid),
        }
        if self.closed_sessions is not None:
            info["closedSessions"] = self.closed_sessions
        if self.errors is not None:
            info["errors"] = self.errors
        return {"info": info}

    def reply_example(self, path: str) -> dict[str, Any]:
        return {
            "summary": self.summary(),
            "description": self.describe(path),
            "value": self.reply_value(),
        }


_COMMON = (
    Exchange(Reply.METHOD_NOT_ALLOWED, "Any method but POST.", method="GET", body=None, headers={}),
    Exchange(
        Reply.TOO_LARGE,
        f"A body of more than {MAX_BODY_BYTES} bytes; nothing else is looked at.",
        padding=MAX_BODY_BYTES,
    ),
    Exchange(
        Reply.UNSUPPORTED_MEDIA_TYPE,
        "A Content-Type none of whose `;`-parts is application/json.",
        headers=_without(Content_Type="text/plain"),
    ),
    Exchange(
        Reply.INTERNAL,
        "Anything unexpected (a bug): the reply carries no detail; the log has it.",
    ),
    Exchange(
        Reply.UNAVAILABLE,
        "Redis does not answer in time (Retry-After says when to try again).",
    ),
)

CLOSE_EXCHANGES = (
    Exchange(Reply.CLOSED, "The session is open and belongs to the token's user."),
    Exchange(Reply.ALREADY_CLOSED, "The same close again: this service closed it already."),
    Exchange(
        Reply.INVALID,
        "A header fails its format (here SessionID).",
        headers=_without(Sessionid="short"),
        errors={"SessionID": ["Must be 8 to 256 characters of A-Z a-z 0-9 . _ -."]},
    ),
    Exchange(Reply.UNAUTHORIZED, "No Authorization header.", headers=_without("Authorization")),
    Exchange(Reply.UNKNOWN_TOKEN, "The token is unknown or has expired."),
    Exchange(
        Reply.SESSION_NOT_FOUND,
        "The session is unknown, has expired, or belongs to another user.",
    ),
    *_COMMON,
)

_KEEP_CURRENT = {"requestContent": {"keepCurrent": True}}
CLOSE_ALL_EXCHANGES = (
    Exchange(
        Reply.SESSIONS_CLOSED,
        "The token's user has three open sessions; the requesting one stays open.",
        body=_KEEP_CURRENT,
        closed_sessions=2,
    ),
    Exchange(
        Reply.NO_SESSIONS_TO_CLOSE,
        "The token's user has no open session left.",
        headers=_without("Sessionid"),
        closed_sessions=0,
    ),
    Exchange(
        Reply.INVALID,
        "keepCurrent is true but no SessionID says which session to keep.",
        headers=_without("Sessionid"),
        body=_KEEP_CURRENT,
        errors={"SessionID": ["Required when keepCurrent is true."]},
    ),
    Exchange(Reply.UNAUTHORIZED, "No Authorization header.", headers=_without("Authorization")),
    Exchange(Reply.UNKNOWN_TOKEN, "The token is unknown or has expired."),
    Exchange(
        Reply.SESSION_NOT_FOUND,
        "keepCurrent is true and SessionID is not an open session of the token's user: "
        "nothing is closed.",
        body=_KEEP_CURRENT,
    ),
    *_COMMON,
)
