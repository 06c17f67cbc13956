"""Login limits against the real `serve` process: concurrent bursts, and no lockout
a stranger can cause. Each client binds its own loopback address (127.0.0.x), so
the service sees distinct addresses without a proxy in between."""

from __future__ import annotations

import asyncio
import collections
import time
from pathlib import Path

import aiohttp
import pytest

from tests.support.service import PASSWORD, USER, ServiceProcess

pytestmark = pytest.mark.slow

BURST = 40
LIMIT = 10


def client_from(address: str) -> aiohttp.ClientSession:
    """A client whose connections come from ``address`` (any of 127.0.0.0/8)."""
    connector = aiohttp.TCPConnector(local_addr=(address, 0), limit=0)
    return aiohttp.ClientSession(connector=connector)


async def log_in(http: aiohttp.ClientSession, url: str, password: str) -> int:
    async with http.post(
        f"{url}/auth/login", json={"username": USER, "password": password}
    ) as response:
        await response.read()
        return response.status


async def burst(url: str, address: str, count: int = BURST) -> collections.Counter[int]:
    """``count`` wrong passwords for one user, all sent at once, from one address."""
    async with client_from(address) as http:
        statuses = await asyncio.gather(
            *(log_in(http, url, f"wrong password {i}") for i in range(count))
        )
    return collections.Counter(statuses)


async def test_a_burst_of_wrong_passwords_gets_no_more_401s_than_the_limit(
    tmp_path: Path, service_env: dict[str, str]
) -> None:
    service = await ServiceProcess(
        ["serve", "--no-worker"], env=service_env, cwd=tmp_path
    ).started()
    try:
        answers = await burst(service.url, "127.0.0.2")
        print(f"burst of {BURST}: {dict(sorted(answers.items()))}")
        assert answers == {401: LIMIT, 429: BURST - LIMIT}
        async with client_from("127.0.0.2") as http:
            assert await log_in(http, service.url, PASSWORD) == 429  # the right one, too late
    finally:
        service.stop()


async def test_a_stranger_hammering_a_name_does_not_lock_its_owner_out(
    tmp_path: Path, service_env: dict[str, str]
) -> None:
    env = {**service_env, "LOGIN_MAX_FAILURES": "3"}
    service = await ServiceProcess(["serve", "--no-worker"], env=env, cwd=tmp_path).started()
    try:
        async with client_from("127.0.0.2") as stranger:
            for i in range(3):
                assert await log_in(stranger, service.url, f"guess {i}") == 401
            assert await log_in(stranger, service.url, "one guess more") == 429
        async with client_from("127.0.0.3") as owner:
            assert await log_in(owner, service.url, PASSWORD) == 200
    finally:
        service.stop()


async def test_failures_from_many_addresses_slow_the_name_down_but_let_its_owner_in(
    tmp_path: Path, service_env: dict[str, str]
) -> None:
    env = {**service_env, "LOGIN_MAX_FAILURES": "3", "LOGIN_SLOWDOWN_MAX_SECONDS": "1.5"}
    service = await ServiceProcess(["serve", "--no-worker"], env=env, cwd=tmp_path).started()
    try:
        for address in ("127.0.0.2", "127.0.0.4", "127.0.0.5"):
            assert await burst(service.url, address, 4) == {401: 3, 429: 1}
        async with client_from("127.0.0.3") as owner:
            started = time.monotonic()
            assert await log_in(owner, service.url, PASSWORD) == 200
            # 9 failures for the name: 4 s, capped at 1.5.
            assert time.monotonic() - started >= 1.5
    finally:
        service.stop()
