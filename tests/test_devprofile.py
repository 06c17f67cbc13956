"""`inngest-outbox serve --dev`: a newcomer's first POST succeeds."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
import yarl

from tests.support.service import ServiceProcess, base_env, run_cli

pytestmark = pytest.mark.slow


async def test_first_post_succeeds_and_the_secret_outlives_a_restart(tmp_path: Path) -> None:
    env = base_env()  # nothing configured: no secret, no S3, default database
    service = ServiceProcess(["serve", "--dev"], env=env, cwd=tmp_path).wait_ready()
    added = run_cli("users", "add", "alice", env=env, cwd=tmp_path, input="a long password\n")
    assert added.returncode == 0, added.stderr
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            login = await http.post(
                f"{service.url}/auth/login",
                json={"username": "alice", "password": "a long password"},
            )
            assert login.status == 200
            response = await http.post(f"{service.url}/api", json={"documentName": "hello.txt"})
            assert response.status == 200, await response.text()
            assert (await response.json())["status"] == "ok"
            cookies = http.cookie_jar.filter_cookies(yarl.URL(service.url))
    finally:
        assert service.stop() == 0
    log = service.log()
    assert "dev profile: generated a session secret in .inngest-outbox/session-secret" in log
    assert "dev profile: no S3 configured; serving a local S3 stand-in at http://127.0.0.1:" in log
    assert "dev profile: created bucket 'inngest-outbox-dev'" in log
    assert "dev profile: database sqlite+aiosqlite:///inngest-outbox.db" in log
    assert (tmp_path / "inngest-outbox.db").exists()
    # Nothing else was created behind the user's back (SQLite's WAL files aside).
    created = {p.name for p in tmp_path.iterdir()}  # noqa: ASYNC240 - a test's own tmp dir
    created -= {"inngest-outbox.db-wal", "inngest-outbox.db-shm"}
    assert {name for name in created if not name.startswith("service-")} == {
        ".inngest-outbox",
        "inngest-outbox.db",
    }

    restarted = ServiceProcess(["serve", "--dev"], env=env, cwd=tmp_path).wait_ready()
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            http.cookie_jar.update_cookies(cookies)
            me = await http.get(f"{restarted.url}/auth/me")
            assert me.status == 200  # the same secret: the session survives a restart
    finally:
        restarted.stop()
    assert "dev profile: generated" not in restarted.log()
