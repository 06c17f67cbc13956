"""The production profile's security defaults, in the real `serve` process."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.service import PASSWORD, USER, ServiceProcess, http_session

pytestmark = pytest.mark.slow

PLAIN_COOKIE_WARNING = "SESSION_COOKIE_SECURE is false"


async def login_cookie_header(url: str) -> str:
    async with (
        http_session() as http,
        http.post(f"{url}/auth/login", json={"username": USER, "password": PASSWORD}) as response,
    ):
        assert response.status == 200
        return response.headers["Set-Cookie"]


async def test_production_session_cookies_are_secure_by_default(
    tmp_path: Path, service_env: dict[str, str]
) -> None:
    env = {k: v for k, v in service_env.items() if k != "SESSION_COOKIE_SECURE"}
    env["LOG_LEVEL"] = "INFO"
    service = ServiceProcess(["serve", "--no-worker"], env=env, cwd=tmp_path)
    try:
        await service.logged("serving on")
        cookie = await login_cookie_header(service.url)
        assert "; Secure" in cookie and "; HttpOnly" in cookie and "SameSite=Lax" in cookie
        assert PLAIN_COOKIE_WARNING not in service.log()
    finally:
        service.stop()


async def test_plain_cookies_in_production_are_said_at_start_up(
    tmp_path: Path, service_env: dict[str, str]
) -> None:
    env = {**service_env, "SESSION_COOKIE_SECURE": "false", "LOG_LEVEL": "INFO"}
    service = ServiceProcess(["serve", "--no-worker"], env=env, cwd=tmp_path)
    try:
        await service.logged("serving on")
        assert "Secure" not in await login_cookie_header(service.url)
        assert f"WARNING service [-] {PLAIN_COOKIE_WARNING}" in service.log()
    finally:
        service.stop()
