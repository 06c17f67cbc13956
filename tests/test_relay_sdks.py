"""The official Inngest SDKs, unchanged, send through a real `serve` by the relay.

Each SDK is configured as an app is, by its environment alone:
``INNGEST_EVENT_API_BASE_URL`` (read for sending events only: the Python SDK's
``get_event_api_origin``, ``inngest/_internal/client_lib/utils.py``; the
JavaScript SDK's ``eventBaseUrl`` getter, ``inngest/components/Inngest.js``)
and ``INNGEST_EVENT_KEY``. Inngest is down while they send; every event is
answered once stored, and once Inngest is up it arrives with the id the SDK
was given and the fields it sent.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fakes.inngest import StandIn
from tests.support import npm
from tests.support.net import free_port
from tests.support.service import ServiceProcess, base_env, call_cli, poll_until, query

pytestmark = pytest.mark.slow

SEND_JS = npm.PROJECT / "tests" / "js" / "send.cjs"

PYTHON_SENDER = """
import json, inngest
client = inngest.Inngest(app_id="relay-test")
one = client.send_sync(inngest.Event(name="py/one", data={"n": 1}))
many = client.send_sync([
    inngest.Event(name="py/batch", data={"n": 2}),
    inngest.Event(name="py/batch", data={"n": 3}, id="py-own-id", ts=1700000000000),
])
print(json.dumps({"one": one, "many": many}))
"""


@pytest.fixture(scope="session")
def inngest_js(pytestconfig: pytest.Config) -> Path:
    """node_modules holding the official JavaScript SDK (see support.npm)."""
    if not npm.installed():
        install = pytestconfig.stash.get(npm.INSTALL, None) or npm.Install().start()
        problem = install.wait()
        if problem is not None:
            if os.environ.get("CI"):
                pytest.fail(problem)  # CI runs the SDK's tests, never skips them
            pytest.skip(problem)
    return npm.NODE_MODULES


@pytest.fixture
def relay_env(service_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """A service whose Inngest is down (nothing listens on its port yet), and a relay key."""
    port = free_port()
    env = {
        **service_env,
        "INNGEST_BASE_URL": f"http://127.0.0.1:{port}",
        "INNGEST_EVENT_KEY": StandIn.event_key,
        "RETRY_BASE_SECONDS": "0.05",
        "RETRY_CAP_SECONDS": "0.5",
        "RETRY_MAX_ATTEMPTS": "1000",
        "WORKER_POLL_SECONDS": "0.2",
    }
    added = call_cli("keys", "add", "shop", env=env, cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    env["RELAY_KEY"] = added.stdout.strip().splitlines()[-1]
    env["STAND_IN_PORT"] = str(port)
    return env


async def run_app(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The app's process, run off the event loop (the stand-in and the checks stay on it)."""
    return await asyncio.to_thread(
        subprocess.run, args, env=env, capture_output=True, text=True, timeout=60
    )


def app_env(relay_url: str, key: str, **extra: str) -> dict[str, str]:
    """An Inngest app's environment, pointed at the relay for its events only."""
    return base_env(INNGEST_EVENT_API_BASE_URL=relay_url, INNGEST_EVENT_KEY=key, **extra)


async def until_inngest_is_up(aiohttp_server, env: dict[str, str], expected: int) -> list[dict]:
    stand_in = StandIn()
    await aiohttp_server(stand_in.app(), port=int(env["STAND_IN_PORT"]))
    await poll_until(lambda: _received(stand_in, expected))
    return stand_in.accepted


async def _received(stand_in: StandIn, expected: int) -> bool:
    return stand_in.accepted_count >= expected


async def pending_rows(env: dict[str, str]) -> dict[str, str]:
    return dict(await query(env, "SELECT id, origin FROM outbox WHERE status <> 'delivered'"))


async def test_the_python_sdk_sends_durably_through_the_relay(
    relay_env: dict[str, str], tmp_path: Path, aiohttp_server
) -> None:
    api = await ServiceProcess(["serve"], env=relay_env, cwd=tmp_path).started()
    try:
        sent = await run_app(
            [sys.executable, "-c", PYTHON_SENDER], app_env(api.url, relay_env["RELAY_KEY"])
        )
        assert sent.returncode == 0, sent.stderr
        ids = json.loads(sent.stdout)
        assert ids["many"][1] == "py-own-id"
        every = [*ids["one"], *ids["many"]]
        # Answered while Inngest is down: stored, not yet delivered.
        assert await pending_rows(relay_env) == dict.fromkeys(every, "shop")
        delivered = await until_inngest_is_up(aiohttp_server, relay_env, 3)
    finally:
        api.stop()
    by_id = {event["id"]: event for event in delivered}
    assert sorted(by_id) == sorted(every) and len(delivered) == 3
    one = by_id[ids["one"][0]]
    assert (one["name"], one["data"]) == ("py/one", {"n": 1})
    own = by_id["py-own-id"]
    assert (own["name"], own["data"], own["ts"]) == ("py/batch", {"n": 3}, 1_700_000_000_000)


async def test_the_javascript_sdk_sends_durably_through_the_relay(
    relay_env: dict[str, str], tmp_path: Path, aiohttp_server, inngest_js: Path
) -> None:
    api = await ServiceProcess(["serve"], env=relay_env, cwd=tmp_path).started()
    try:
        sent = await run_app(
            ["node", str(SEND_JS), "sdk"],
            app_env(api.url, relay_env["RELAY_KEY"], NODE_PATH=str(inngest_js)),
        )
        assert sent.returncode == 0, sent.stderr
        ids = json.loads(sent.stdout)
        every = [*ids["one"], *ids["many"]]
        assert ids["many"][1] == "js-own-id"
        assert await pending_rows(relay_env) == dict.fromkeys(every, "shop")
        delivered = await until_inngest_is_up(aiohttp_server, relay_env, 3)
    finally:
        api.stop()
    by_id = {event["id"]: event for event in delivered}
    assert sorted(by_id) == sorted(every)
    one = by_id[ids["one"][0]]
    assert {k: one[k] for k in ("name", "data", "user", "v")} == {
        "name": "js/one",
        "data": {"n": 1},
        "user": {"id": "u1"},
        "v": "1",
    }
    own = by_id["js-own-id"]
    assert (own["name"], own["data"], own["ts"]) == ("js/batch", {"n": 3}, 1_700_000_000_000)


async def test_the_example_route_sends_its_event_durably(
    relay_env: dict[str, str], tmp_path: Path, aiohttp_server, inngest_js: Path
) -> None:
    body = {
        "v": "1",
        "ts": 1_700_000_000_500,
        "name": "documents/document.requested",
        "user": {"id": 42, "username": "alice"},
        "data": {"documentName": "report.pdf"},
    }
    api = await ServiceProcess(["serve"], env=relay_env, cwd=tmp_path).started()
    try:
        sent = await run_app(
            ["node", str(SEND_JS), "example", json.dumps(body)],
            app_env(api.url, relay_env["RELAY_KEY"], NODE_PATH=str(inngest_js)),
        )
        assert sent.returncode == 0, sent.stderr
        [event_id] = json.loads(sent.stdout)["ids"]
        delivered = await until_inngest_is_up(aiohttp_server, relay_env, 1)
    finally:
        api.stop()
    assert delivered == [{**body, "id": event_id}]


async def test_an_sdk_with_a_revoked_key_is_refused(
    relay_env: dict[str, str], tmp_path: Path
) -> None:
    revoked = call_cli("keys", "revoke", "shop", env=relay_env, cwd=tmp_path)
    assert revoked.returncode == 0, revoked.stderr
    api = await ServiceProcess(["serve"], env=relay_env, cwd=tmp_path).started()
    try:
        sent = await run_app(
            [sys.executable, "-c", PYTHON_SENDER], app_env(api.url, relay_env["RELAY_KEY"])
        )
    finally:
        api.stop()
    assert sent.returncode == 1
    assert "Event key not found" in sent.stderr
    assert await query(relay_env, "SELECT count(*) FROM outbox") == [(0,)]
