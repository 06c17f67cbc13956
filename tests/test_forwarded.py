"""Who sent a request: the peer, or what a proxy in TRUSTED_PROXIES says."""

from __future__ import annotations

import ipaddress

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from service.app import create_app
from service.config import Settings
from service.keys import SETTINGS
from service.web.forwarded import client_address, parse_origin, request_scheme
from tests.conftest import PASSWORD

PROBLEM = "application/problem+json"


async def echo(request: web.Request) -> web.Response:
    return web.json_response({"client": client_address(request), "scheme": request_scheme(request)})


def networks(*items: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(item) for item in items)


@pytest.fixture
def serve_echo(aiohttp_client):  # type: ignore[no-untyped-def]
    """The test client's peer address is 127.0.0.1."""

    async def serve(*trusted: str) -> TestClient:
        app = web.Application()
        app[SETTINGS] = Settings(trusted_proxies=networks(*trusted))
        app.router.add_get("/", echo)
        return await aiohttp_client(app)

    return serve


async def seen(client: TestClient, **headers: str) -> dict[str, str]:
    return await (await client.get("/", headers=headers)).json()


async def test_forwarded_headers_are_ignored_by_default(serve_echo) -> None:  # type: ignore[no-untyped-def]
    client = await serve_echo()
    answer = await seen(client, **{"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"})
    assert answer == {"client": "127.0.0.1", "scheme": "http"}


async def test_forwarded_headers_are_ignored_from_a_peer_not_listed(serve_echo) -> None:  # type: ignore[no-untyped-def]
    client = await serve_echo("10.0.0.0/8")
    answer = await seen(client, **{"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"})
    assert answer == {"client": "127.0.0.1", "scheme": "http"}


@pytest.mark.parametrize(
    ("forwarded_for", "client"),
    [
        ("203.0.113.7", "203.0.113.7"),
        # The client wrote the left part itself: the nearest untrusted hop counts.
        ("198.51.100.1, 203.0.113.7", "203.0.113.7"),
        # Through a second trusted proxy (10.1.2.3), to the client before it.
        ("198.51.100.1, 203.0.113.7, 10.1.2.3", "203.0.113.7"),
        ("10.1.2.3", "10.1.2.3"),  # only proxies: the farthest of them
        ("203.0.113.7, not-an-address", "127.0.0.1"),  # garbled: the last believable hop
        ("2001:DB8::1", "2001:db8::1"),
        ("", "127.0.0.1"),
    ],
)
async def test_a_trusted_proxy_names_the_client(  # type: ignore[no-untyped-def]
    serve_echo, forwarded_for: str, client: str
) -> None:
    server = await serve_echo("127.0.0.1", "10.0.0.0/8")
    assert (await seen(server, **{"X-Forwarded-For": forwarded_for}))["client"] == client


async def test_a_trusted_proxy_names_the_scheme(serve_echo) -> None:  # type: ignore[no-untyped-def]
    client = await serve_echo("127.0.0.1")
    assert (await seen(client, **{"X-Forwarded-Proto": "https"}))["scheme"] == "https"
    assert (await seen(client, **{"X-Forwarded-Proto": "gopher"}))["scheme"] == "http"
    assert (await seen(client))["scheme"] == "http"


@pytest.mark.parametrize(
    ("text", "origin"),
    [
        ("https://App.Example", ("https", "app.example", 443)),
        ("https://app.example:443/", ("https", "app.example", 443)),
        ("http://app.example", ("http", "app.example", 80)),
        ("http://127.0.0.1:8080", ("http", "127.0.0.1", 8080)),
        ("http://[::1]:8080", ("http", "::1", 8080)),
        ("null", None),
        ("ftp://app.example", None),
        ("https://app.example/path", None),
        ("https://user@app.example", None),
        ("https://app.example:99999", None),
    ],
)
def test_origins_compare_by_scheme_host_and_port(text: str, origin: object) -> None:
    assert parse_origin(text) == origin


# -- the login limits behind a proxy -------------------------------------------------


async def login_from(client: TestClient, address: str, password: str = "wrong password") -> int:
    response = await client.post(
        "/auth/login",
        json={"username": "alice", "password": password},
        headers={"X-Forwarded-For": address},
    )
    return response.status


async def test_behind_a_trusted_proxy_each_client_has_its_own_limit(
    aiohttp_client, settings: Settings, user
) -> None:  # type: ignore[no-untyped-def]
    client = await aiohttp_client(
        create_app(settings.replace(login_max_failures=2, trusted_proxies=networks("127.0.0.1/32")))
    )
    assert [await login_from(client, "203.0.113.7") for _ in range(3)] == [401, 401, 429]
    assert await login_from(client, "203.0.113.8", PASSWORD) == 200


async def test_without_trusted_proxies_a_forwarded_address_changes_nothing(
    aiohttp_client, settings: Settings, user
) -> None:  # type: ignore[no-untyped-def]
    client = await aiohttp_client(create_app(settings.replace(login_max_failures=2)))
    assert [await login_from(client, "203.0.113.7") for _ in range(2)] == [401, 401]
    assert await login_from(client, "203.0.113.8", PASSWORD) == 429  # the same peer
