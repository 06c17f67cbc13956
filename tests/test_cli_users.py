"""Managing users from the command line, seen by running `serve` processes:
password changes, disabling, and logging a user out everywhere."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from tests.support.service import (
    PASSWORD,
    USER,
    ServiceProcess,
    call_cli,
    http_session,
    log_in,
    poll_until,
    query,
)

pytestmark = pytest.mark.slow

CHECK_SECONDS = 2.0
NEW_PASSWORD = "another long password"


@pytest.fixture
def env(service_env: dict[str, str]) -> dict[str, str]:
    return {**service_env, "SESSION_CHECK_SECONDS": str(CHECK_SECONDS)}


async def cli(env: dict[str, str], cwd: Path, *args: str, input: str | None = None):  # type: ignore[no-untyped-def]
    return await asyncio.to_thread(call_cli, *args, env=env, cwd=cwd, input=input)


async def me(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(f"{url}/auth/me") as response:
        return response.status


async def login_status(url: str, password: str) -> int:
    async with (
        http_session() as http,
        http.post(f"{url}/auth/login", json={"username": USER, "password": password}) as response,
    ):
        return response.status


async def refused_within_the_check_interval(
    sessions: list[tuple[aiohttp.ClientSession, str]],
) -> None:
    """Each process refuses its session within SESSION_CHECK_SECONDS of the change."""
    started = time.monotonic()

    async def all_refused() -> bool:
        return all([await me(http, url) == 401 for http, url in sessions])

    await poll_until(all_refused, wait_seconds=CHECK_SECONDS + 10)
    assert time.monotonic() - started <= CHECK_SECONDS + 1.0


async def test_sessions_revoke_logs_the_user_out_of_every_process(
    tmp_path: Path, env: dict[str, str]
) -> None:
    first = await ServiceProcess(["serve", "--no-worker"], env=env, cwd=tmp_path).started()
    second = await ServiceProcess(["serve", "--no-worker"], env=env, cwd=tmp_path).started()
    try:
        async with http_session() as one, http_session() as two:
            await log_in(one, first.url)
            await log_in(two, second.url)
            assert await me(one, first.url) == 200 and await me(two, second.url) == 200
            revoked = await cli(env, tmp_path, "users", "sessions", "revoke", USER)
            assert revoked.returncode == 0, revoked.stderr
            assert revoked.stdout == (
                f"revoked 2 sessions of '{USER}'; every process refuses them within "
                f"SESSION_CHECK_SECONDS ({CHECK_SECONDS:g} s)\n"
            )
            await refused_within_the_check_interval([(one, first.url), (two, second.url)])
        assert await login_status(first.url, PASSWORD) == 200  # logging in again works
    finally:
        first.stop()
        second.stop()


async def test_passwd_changes_the_password_and_ends_the_sessions(
    tmp_path: Path, env: dict[str, str]
) -> None:
    service = await ServiceProcess(["serve", "--no-worker"], env=env, cwd=tmp_path).started()
    try:
        async with http_session() as http:
            await log_in(http, service.url)
            assert await me(http, service.url) == 200
            changed = await cli(env, tmp_path, "users", "passwd", USER, input=NEW_PASSWORD + "\n")
            assert changed.returncode == 0, changed.stderr
            assert changed.stdout == f"changed the password of '{USER}'; 1 session ended\n"
            assert NEW_PASSWORD not in changed.stdout + changed.stderr
            await refused_within_the_check_interval([(http, service.url)])
        assert await login_status(service.url, PASSWORD) == 401
        assert await login_status(service.url, NEW_PASSWORD) == 200
    finally:
        service.stop()


async def test_disable_refuses_logins_and_sessions_until_enable(
    tmp_path: Path, env: dict[str, str]
) -> None:
    service = await ServiceProcess(["serve", "--no-worker"], env=env, cwd=tmp_path).started()
    try:
        async with http_session() as http:
            await log_in(http, service.url)
            disabled = await cli(env, tmp_path, "users", "disable", USER)
            assert disabled.returncode == 0, disabled.stderr
            assert disabled.stdout == f"disabled '{USER}'; 1 session ended\n"
            await refused_within_the_check_interval([(http, service.url)])
        assert await login_status(service.url, PASSWORD) == 401  # as for a wrong password
        again = await cli(env, tmp_path, "users", "disable", USER)
        assert again.stdout == f"disabled '{USER}'; 0 sessions ended\n"
        enabled = await cli(env, tmp_path, "users", "enable", USER)
        assert (enabled.returncode, enabled.stdout) == (0, f"enabled '{USER}'\n")
        assert await login_status(service.url, PASSWORD) == 200
    finally:
        service.stop()


async def test_an_unknown_user_is_an_error(tmp_path: Path, env: dict[str, str]) -> None:
    for command in (("passwd",), ("disable",), ("enable",), ("sessions", "revoke")):
        result = await cli(env, tmp_path, "users", *command, "bob", input=NEW_PASSWORD + "\n")
        assert (result.returncode, result.stdout) == (1, ""), command
        assert result.stderr == "inngest-outbox: no user 'bob'\n"


async def test_passwd_refuses_a_short_password(tmp_path: Path, env: dict[str, str]) -> None:
    stored = "SELECT password_hash FROM users"
    before = await query(env, stored)
    result = await cli(env, tmp_path, "users", "passwd", USER, input="short\n")
    assert result.returncode == 2
    assert result.stderr == "inngest-outbox: a password is 8 to 1024 characters long\n"
    assert await query(env, stored) == before
