"""The production profile's security defaults, in the real `serve` process."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from tests.support.net import free_port
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


async def test_metrics_port_serves_metrics_and_details_beside_the_api(
    tmp_path: Path, service_env: dict[str, str]
) -> None:
    port = free_port()
    env = {k: v for k, v in service_env.items() if k != "METRICS_TOKEN"}
    env.update(METRICS_PORT=str(port), LOG_LEVEL="INFO")
    service = ServiceProcess(["serve"], env=env, cwd=tmp_path)
    try:
        await service.logged(f"serving /metrics and /readyz's details on http://127.0.0.1:{port}")
        async with aiohttp.ClientSession() as http:
            assert (await http.get(f"{service.url}/metrics")).status == 404
            public = await (await http.get(f"{service.url}/readyz")).json()
            assert set(public["checks"]["worker"]) == {"state"}
            response = await http.get(f"http://127.0.0.1:{port}/metrics")
            assert response.status == 200
            assert "inngest_outbox_deliveries_total" in await response.text()
            private = await (await http.get(f"http://127.0.0.1:{port}/readyz")).json()
            assert private["checks"]["worker"] == {"state": "ok", "detail": "no send yet"}
            assert set(private["checks"]["database"]) == {"state", "revision"}
        assert "/metrics is open" not in service.log()
    finally:
        service.stop()
