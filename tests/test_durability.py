"""An acknowledged event is on disk: SIGKILL right after the answer loses nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from tests.support.service import ServiceProcess, http_session, log_in, query

pytestmark = pytest.mark.slow


async def stored(env: dict[str, str]) -> tuple[set[str], set[str]]:
    events = {row[0] for row in await query(env, "SELECT id FROM outbox")}
    documents = {row[0] for row in await query(env, "SELECT event_id FROM documents")}
    return events, documents


async def test_event_is_stored_when_killed_right_after_the_answer(
    tmp_path: Path, any_service_env: dict[str, str]
) -> None:
    service = await ServiceProcess(["serve"], env=any_service_env, cwd=tmp_path).started()
    async with http_session() as http:
        await log_in(http, service.url)
        response = await http.post(f"{service.url}/api", json={"documentName": "a.pdf"})
        assert response.status == 200
        service.kill()
    event_id = (await response.json())["id"]
    assert await stored(any_service_env) == ({event_id}, {event_id})


async def test_every_acknowledged_event_survives_a_kill_under_load(
    tmp_path: Path, any_service_env: dict[str, str]
) -> None:
    service = await ServiceProcess(["serve"], env=any_service_env, cwd=tmp_path).started()
    acknowledged: list[str] = []
    enough = asyncio.Event()

    async def post(http: aiohttp.ClientSession, i: int) -> None:
        async with http.post(f"{service.url}/api", json={"documentName": f"d{i}"}) as response:
            if response.status == 200:
                acknowledged.append((await response.json())["id"])
                if len(acknowledged) >= 50:
                    enough.set()

    connector = aiohttp.TCPConnector(limit=32)
    async with aiohttp.ClientSession(
        connector=connector, cookie_jar=aiohttp.CookieJar(unsafe=True)
    ) as http:
        await log_in(http, service.url)
        posts = [asyncio.create_task(post(http, i)) for i in range(400)]
        async with asyncio.timeout(60):
            await enough.wait()
        service.kill()  # requests still in flight die with it, unanswered
        results = await asyncio.gather(*posts, return_exceptions=True)
    assert any(isinstance(r, aiohttp.ClientError) for r in results), "the kill came too late"
    events, documents = await stored(any_service_env)
    assert set(acknowledged) <= events
    assert events == documents  # never one without the other
