"""Where the transmitter may send: receivers' URLs are https and reach public addresses
only, unless SIGNALS_ALLOW_HTTP is true (local use). Checked when a receiver registers
(`check_url`), and again at every connection (`PublicResolver`), so that a name that
later resolves to an inside address (DNS rebinding) is refused too. Redirects are never
followed (the delivery's request says so)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver


class ForbiddenUrl(ValueError):
    """A receiver URL the transmitter must not call; the message says why."""


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


async def check_url(url: str, *, allow_http: bool) -> str:
    """The URL as given when the transmitter may call it; else ForbiddenUrl."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError as exc:
        raise ForbiddenUrl(f"not a URL: {exc}") from None
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ForbiddenUrl("must be an https:// URL with a host")
    if parts.username or parts.password:
        raise ForbiddenUrl("must not carry a user or password")
    if allow_http:
        return url
    if parts.scheme != "https":
        raise ForbiddenUrl("must be https (http only with SIGNALS_ALLOW_HTTP=true)")
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            parts.hostname, parts.port or 443, type=socket.SOCK_STREAM
        )
    except OSError as exc:
        raise ForbiddenUrl(f"host does not resolve: {exc}") from None
    inside = sorted({str(info[4][0]) for info in infos if not _public(str(info[4][0]))})
    if inside:
        raise ForbiddenUrl(
            f"host resolves to a loopback, private or link-local address ({', '.join(inside)})"
        )
    return url


class PublicResolver(AbstractResolver):
    """aiohttp's resolver, refusing any name that resolves to a non-public address."""

    def __init__(self) -> None:
        self._resolver = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._resolver.resolve(host, port, family)
        if not all(_public(result["host"]) for result in results):
            raise OSError(f"{host} resolves to a loopback, private or link-local address")
        return results

    async def close(self) -> None:
        await self._resolver.close()
