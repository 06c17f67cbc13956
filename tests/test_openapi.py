"""The OpenAPI document: it names exactly the routes the app serves, and the live
service answers as it says (Schemathesis, in a process of its own)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from service.app import create_app
from service.config import Settings
from service.web.openapi import SPEC
from tests.support.service import PASSWORD, ServiceProcess, http_session, run_cli


def served_routes(app: web.Application) -> set[tuple[str, str]]:
    routes = set()
    for route in app.router.routes():
        if route.method in ("HEAD", "OPTIONS"):
            continue  # aiohttp adds HEAD for every GET
        routes.add((route.method.lower(), route.resource.canonical))  # type: ignore[union-attr]
    return routes


def test_the_document_names_every_route_and_no_other(settings: Settings) -> None:
    documented = {(method, path) for path, methods in SPEC["paths"].items() for method in methods}
    assert documented == served_routes(create_app(settings))


async def test_it_is_served_as_openapi_3_1(client: TestClient) -> None:
    response = await client.get("/openapi.json")
    assert response.status == 200
    assert response.content_type == "application/json"
    assert (await response.json()) == SPEC
    assert SPEC["openapi"] == "3.1.0"


@pytest.fixture
def schemathesis() -> str:
    """Schemathesis's command beside this Python (installed by .[test]). Under
    CI a missing one fails the test: CI must run it, never skip it."""
    command = shutil.which("st", path=os.path.dirname(sys.executable))
    if command is None:
        message = f"no Schemathesis `st` in {os.path.dirname(sys.executable)} (pip install .[test])"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return command


@pytest.mark.slow
async def test_schemathesis_finds_no_server_error_and_no_answer_off_the_spec(
    tmp_path: Path, service_env: dict[str, str], schemathesis: str
) -> None:
    assert (
        run_cli(
            "users", "add", "root", "--admin", env=service_env, cwd=tmp_path, input=PASSWORD + "\n"
        ).returncode
        == 0
    )
    service = await ServiceProcess(
        ["serve", "--no-worker"], env=service_env, cwd=tmp_path
    ).started()
    try:
        async with http_session() as http:
            response = await http.post(
                f"{service.url}/auth/login", json={"username": "root", "password": PASSWORD}
            )
            assert response.status == 200
            cookie = response.cookies["inngest_outbox_session"].value
        command = [
            schemathesis, "run", f"{service.url}/openapi.json",
            "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
            "response_schema_conformance",
            "--max-examples", "25", "--seed", "1", "--workers", "1", "--no-color",
            "-H", f"Cookie: inngest_outbox_session={cookie}",
            # Logging out would end the run's own session half-way.
            "--exclude-path", "/auth/logout",
        ]  # fmt: skip
        result = await asyncio.to_thread(
            subprocess.run, command, capture_output=True, text=True, timeout=300, cwd=tmp_path
        )
    finally:
        service.stop()
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    # Not a vacuous pass: every operation selected was exercised.
    selected = re.search(r"Selected: (\d+)/\d+", result.stdout)
    assert selected is not None and int(selected.group(1)) >= 12, result.stdout[-3000:]
    assert f"Tested: {selected.group(1)}" in result.stdout, result.stdout[-3000:]
