"""No secret leaves the service: a full run, then a search of everything it said."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest

from tests.fakes.inngest import Fault, StandIn
from tests.support.service import (
    OPERATOR,
    PASSWORD,
    USER,
    ServiceProcess,
    http_session,
    log_in,
    run_cli,
)

pytestmark = pytest.mark.slow


async def test_no_secret_in_logs_errors_events_or_metrics(
    tmp_path: Path, service_env: dict[str, str], inngest: StandIn
) -> None:
    env = {
        **service_env,
        "INNGEST_BASE_URL": inngest.base_url,  # type: ignore[attr-defined]
        "INNGEST_EVENT_KEY": "wrong-key-0f9e8d7c6b5a",  # refused at first: the error path
        "LOG_LEVEL": "DEBUG",
        "LOG_FORMAT": "json",
        "ACCESS_LOG": "true",
        "RETRY_BASE_SECONDS": "0.01",
        "WORKER_POLL_SECONDS": "0.2",
    }
    secrets = {
        "session secret": env["SESSION_SECRET"],
        "Inngest key (wrong)": env["INNGEST_EVENT_KEY"],
        "Inngest key": inngest.event_key,
        "AWS access key id": env["AWS_ACCESS_KEY_ID"],
        "AWS secret key": env["AWS_SECRET_ACCESS_KEY"],
        "password": PASSWORD,
        "metrics token": env["METRICS_TOKEN"],
    }
    admin = run_cli("users", "add", "root", "--admin", env=env, cwd=tmp_path, input=PASSWORD + "\n")
    assert admin.returncode == 0
    said: list[str] = [admin.stdout, admin.stderr]

    service = await ServiceProcess(["serve"], env=env, cwd=tmp_path).started()
    try:
        async with http_session() as http:
            wrong = await http.post(
                f"{service.url}/auth/login", json={"username": USER, "password": PASSWORD + "x"}
            )
            said.append(await wrong.text())
            await log_in(http, service.url)
            for request in (
                {"json": {"documentName": "a.pdf", "note": "hello"}},
                {"json": {"documentName": ""}},
                {"data": b"{not json", "headers": {"Content-Type": "application/json"}},
                {"data": b"x", "headers": {"Content-Type": "text/plain"}},
                {"json": {"documentName": "a", "blob": "x" * 300_000}},
            ):
                response = await http.post(f"{service.url}/api", **request)  # type: ignore[arg-type]
                said.append(await response.text())
            event_id = json.loads(said[-5])["id"]  # the first POST's answer
            # The key is refused, then (the stand-in changes its mind) garbage, then accepted.
            async with asyncio.timeout(20):
                await inngest.wait_until(lambda s: s.request_count >= 1)
            inngest.event_key = env["INNGEST_EVENT_KEY"]
            inngest.fail_next(Fault.GARBAGE_200)
            async with asyncio.timeout(30):
                await inngest.wait_until(lambda s: event_id in s.accepted_ids)
            for path in ("/readyz", "/metrics", f"/api/events/{event_id}", "/auth/me"):
                said.append(await (await http.get(f"{service.url}{path}")).text())
            for path in ("/readyz", "/metrics"):  # with the details an operator sees
                response = await http.get(f"{service.url}{path}", headers=OPERATOR)
                said.append(await response.text())
        async with http_session() as http:
            response = await http.post(
                f"{service.url}/auth/login", json={"username": "root", "password": PASSWORD}
            )
            assert response.status == 200
            for path in ("/admin", "/admin/api/stats", f"/admin/api/events/{event_id}", "/readyz"):
                said.append(await (await http.get(f"{service.url}{path}")).text())
        async with aiohttp.ClientSession(headers=OPERATOR) as http:
            said.append(await (await http.get(f"{service.url}/metrics")).text())
    finally:
        assert service.stop() == 0
    show = run_cli("show", event_id, "--json", env=env, cwd=tmp_path)
    said += [show.stdout, show.stderr, service.log(), json.dumps(inngest.accepted)]
    said += [json.dumps(r, default=str) for r in inngest.requests]  # headers sent

    everything = "\n".join(said)
    assert '"refused the event key' in everything or "refused the event key" in everything
    assert event_id in everything  # the search reads what the run produced
    found = {name for name, secret in secrets.items() if secret in everything}
    assert found == set()
