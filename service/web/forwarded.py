"""Who sent a request, and how: the peer's address, or what a trusted proxy says.

A proxy's X-Forwarded-For and X-Forwarded-Proto are believed only when the peer
is one of TRUSTED_PROXIES; anyone else could write them. Without the list, the
peer is the client.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from aiohttp import web

from ..config import IPNetwork
from ..keys import SETTINGS

DEFAULT_PORTS = {"http": 80, "https": 443}
# (scheme, host, port): what a browser's Origin names.
Origin = tuple[str, str, int]


def _trusted(address: str | None, proxies: tuple[IPNetwork, ...]) -> bool:
    if not address or not proxies:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False  # a Unix socket's peer, say: nothing to match
    return any(ip in network for network in proxies)


def _proxies(request: web.Request) -> tuple[IPNetwork, ...]:
    settings = request.app.get(SETTINGS)  # a worker's status app has none
    return settings.trusted_proxies if settings is not None else ()


def client_address(request: web.Request) -> str:
    """The client's address: the peer's, or, from a trusted proxy, the nearest
    address in X-Forwarded-For that is not itself a trusted proxy.

    The list is read from the right: each proxy appends the address it saw, so
    entries left of the first untrusted one may have been written by the client.
    """
    proxies = _proxies(request)
    address = request.remote or "-"
    if not _trusted(address, proxies):
        return address
    hops = [
        hop.strip()
        for header in request.headers.getall("X-Forwarded-For", ())
        for hop in header.split(",")
    ]
    for hop in reversed(hops):
        try:
            hop = str(ipaddress.ip_address(hop))
        except ValueError:
            return address  # a garbled hop: the last address that can be believed
        if not _trusted(hop, proxies):
            return hop
        address = hop
    return address


def request_scheme(request: web.Request) -> str:
    """http or https as the client used it: a trusted proxy that ends TLS says so
    in X-Forwarded-Proto (the value it set: the last one)."""
    if _trusted(request.remote, _proxies(request)):
        forwarded = request.headers.get("X-Forwarded-Proto", "")
        proto = forwarded.rsplit(",", 1)[-1].strip().lower()
        if proto in DEFAULT_PORTS:
            return proto
    return request.scheme


def parse_origin(text: str) -> Origin | None:
    """An Origin header or an ALLOWED_ORIGINS entry as (scheme, host, port); None
    for what is not one (``null``, a path, another scheme)."""
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/"):
        return None
    if parts.query or parts.fragment or parts.username is not None:
        return None
    return scheme, parts.hostname.lower(), port if port is not None else DEFAULT_PORTS[scheme]


def own_origin(request: web.Request) -> Origin | None:
    """The origin the client reached: its scheme, and the Host it sent."""
    return parse_origin(f"{request_scheme(request)}://{request.host}")
