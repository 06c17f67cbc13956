"""PostgreSQL specifics: LISTEN/NOTIFY wake-ups across processes, and claims
that skip each other's locked rows."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from service.store.database import Database
from service.store.postgres.listener import Listener
from tests.fakes.inngest import StandIn
from tests.support.postgres import postgres_copy
from tests.support.service import ServiceProcess, http_session, log_in, query

pytestmark = pytest.mark.slow


@pytest.fixture
def pg_env(
    request: pytest.FixtureRequest, service_env: dict[str, str], inngest: StandIn
) -> dict[str, str]:
    env = {
        **service_env,
        "DATABASE_URL": postgres_copy(request, "postgres_with_user"),
        "INNGEST_BASE_URL": inngest.base_url,  # type: ignore[attr-defined]
        "INNGEST_EVENT_KEY": inngest.event_key,
        # A minute's poll: only a notification can deliver within the tests' timeouts.
        "WORKER_POLL_SECONDS": "60",
        "LOG_LEVEL": "INFO",
    }
    return env


async def test_a_commit_in_one_process_wakes_a_worker_in_another(
    tmp_path: Path, pg_env: dict[str, str], inngest: StandIn
) -> None:
    worker = ServiceProcess(["worker"], env=pg_env, cwd=tmp_path)
    await worker.logged("delivering to")
    api = await ServiceProcess(["serve", "--no-worker"], env=pg_env, cwd=tmp_path).started()
    try:
        async with http_session() as http:
            await log_in(http, api.url)
            response = await http.post(f"{api.url}/api", json={"documentName": "a.pdf"})
            event_id = (await response.json())["id"]
        async with asyncio.timeout(10):
            await inngest.received(1)
        assert inngest.accepted_ids == [event_id]
    finally:
        api.stop()
        assert worker.stop() == 0, worker.log()


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_a_dropped_listener_connection_is_re_established(
    db: Database, engine: AsyncEngine
) -> None:
    wake = asyncio.Event()
    listener = Listener(db.url, wake)
    task = asyncio.create_task(listener.run())
    try:
        async with asyncio.timeout(10):
            await listener.connected.wait()
        wake.clear()
        async with engine.connect() as conn:
            await conn.exec_driver_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()"
            )
        async with asyncio.timeout(15):
            await wake.wait()  # given on reconnecting: notifications meanwhile are lost
        assert listener.connections == 2
        wake.clear()
        async with engine.begin() as conn:
            await conn.exec_driver_sql("NOTIFY inngest_outbox")
        async with asyncio.timeout(10):
            await wake.wait()
        assert listener.notifications >= 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_two_api_and_two_worker_processes_lose_nothing_when_a_worker_is_killed(
    tmp_path: Path, pg_env: dict[str, str], inngest: StandIn
) -> None:
    env = {
        **pg_env,
        "WORKER_LEASE_SECONDS": "2",
        "WORKER_POLL_SECONDS": "0.5",
        "WORKER_BATCH_SIZE": "20",
        "LOG_LEVEL": "WARNING",
    }
    workers = [ServiceProcess(["worker"], env=env, cwd=tmp_path) for _ in range(2)]
    apis = [
        await ServiceProcess(["serve", "--no-worker"], env=env, cwd=tmp_path).started()
        for _ in range(2)
    ]
    acknowledged: list[str] = []
    halfway = asyncio.Event()

    async def post(http, url: str, i: int) -> None:  # type: ignore[no-untyped-def]
        response = await http.post(f"{url}/api", json={"documentName": f"d{i}"})
        assert response.status == 200, await response.text()
        acknowledged.append((await response.json())["id"])
        if len(acknowledged) >= 150:
            halfway.set()

    try:
        async with http_session() as first, http_session() as second:
            await log_in(first, apis[0].url)
            await log_in(second, apis[1].url)
            posts = [
                asyncio.create_task(
                    post(*((first, apis[0].url) if i % 2 else (second, apis[1].url)), i)
                )
                for i in range(300)
            ]
            async with asyncio.timeout(60):
                await halfway.wait()
            workers[0].kill()  # mid-run: its leased rows come back after 2 s
            # What it may have had in flight: rows still leased to it once it is dead. (A
            # snapshot of the stand-in's ids would miss a batch it wrote just before dying
            # that the stand-in has not read yet.)
            in_flight = {
                str(row[0])
                for row in await query(
                    env,
                    "SELECT id FROM outbox WHERE status = 'sending' "
                    f"AND lease_owner LIKE '%:{workers[0].process.pid}:%'",
                )
            }
            await asyncio.gather(*posts)
        async with asyncio.timeout(60):
            await inngest.wait_until(lambda s: set(acknowledged) <= set(s.accepted_ids))
    finally:
        for api in apis:
            api.stop()
        workers[1].stop()
    counts = inngest.accepted_counts()
    assert set(counts) == set(acknowledged)
    # Sent twice only what the killed worker may have had in flight.
    assert {i for i, n in counts.items() if n > 1} <= in_flight
