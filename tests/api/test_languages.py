"""Accept-Language decides the reply's language by its q-values (RFC 9110 12.5.4), not by
the order the languages are listed in: Spanish when Spanish has the higher weight, and
never for a Spanish weight of 0 ("not acceptable")."""

from __future__ import annotations

import pytest

from tests.support.closing import Client, info_of

SPANISH, ENGLISH = "No encontrado", "Not found"


@pytest.mark.parametrize(
    ("accept_language", "title"),
    [
        ("en;q=0.1, es", SPANISH),
        ("en;q=0.1,es;q=0.2", SPANISH),
        ("fr, en;q=0.4, es-MX;q=0.8", SPANISH),
        ("es;q=0.1, en", ENGLISH),
        ("es;q=0.5, en;q=0.6", ENGLISH),
        ("es;q=0", ENGLISH),
        ("es;q=0, en;q=0.1", ENGLISH),
        ("es;q=0.000", ENGLISH),
    ],
)
async def test_the_language_with_the_higher_q_value_answers(
    client: Client, accept_language: str, title: str
) -> None:
    resp = await client.get("/nowhere", headers={"Accept-Language": accept_language})
    info = await info_of(resp, 404, "error")
    assert info["title"] == title
