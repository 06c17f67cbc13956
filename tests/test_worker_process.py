"""The worker as real processes: `worker`, `serve --no-worker`, signals, kill and restart."""

from __future__ import annotations

import asyncio
import re
import signal
from pathlib import Path

import aiohttp
import pytest

from tests.fakes.inngest import Fault, StandIn
from tests.support.net import free_port
from tests.support.service import (
    OPERATOR,
    ServiceProcess,
    http_session,
    log_in,
    poll_until,
    query,
    run_cli,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def env(any_service_env: dict[str, str], inngest: StandIn) -> dict[str, str]:
    return {
        **any_service_env,
        "INNGEST_BASE_URL": inngest.base_url,  # type: ignore[attr-defined]
        "INNGEST_EVENT_KEY": inngest.event_key,
        "RETRY_BASE_SECONDS": "0.05",
        "RETRY_CAP_SECONDS": "0.2",
        "WORKER_POLL_SECONDS": "0.5",
        "WORKER_LEASE_SECONDS": "2",
        "LOG_LEVEL": "INFO",
    }


async def rows(env: dict[str, str]) -> dict[str, str]:
    return dict(await query(env, "SELECT id, status FROM outbox"))


async def post_documents(url: str, count: int) -> list[str]:
    async with http_session() as http:
        await log_in(http, url)
        ids = []
        for i in range(count):
            response = await http.post(f"{url}/api", json={"documentName": f"d{i}"})
            assert response.status == 200
            ids.append((await response.json())["id"])
        return ids


async def test_api_only_process_leaves_delivery_to_worker_processes(
    tmp_path: Path, env: dict[str, str], inngest: StandIn
) -> None:
    api = await ServiceProcess(["serve", "--no-worker"], env=env, cwd=tmp_path).started()
    try:
        ids = await post_documents(api.url, 5)
        async with aiohttp.ClientSession() as http:
            ready = await (await http.get(f"{api.url}/readyz", headers=OPERATOR)).json()
        assert ready["checks"]["worker"] == {
            "state": "elsewhere",
            "detail": "serve --no-worker: worker processes deliver",
        }
        assert ready["status"] == "ok"
        assert set((await rows(env)).values()) == {"pending"}

        burst = await asyncio.to_thread(run_cli, "worker", "--burst", env=env, cwd=tmp_path)
        assert burst.returncode == 0, burst.stderr
        assert burst.stdout == "delivered 5, rescheduled 0, failed 0\n"
        assert sorted(inngest.accepted_ids) == sorted(ids)
    finally:
        api.stop()


async def test_worker_process_delivers_rows_written_by_another_process(
    tmp_path: Path, env: dict[str, str], inngest: StandIn
) -> None:
    worker = ServiceProcess(["worker"], env=env, cwd=tmp_path)
    await worker.logged("delivering to")
    api = await ServiceProcess(["serve", "--no-worker"], env=env, cwd=tmp_path).started()
    try:
        ids = await post_documents(api.url, 3)
        async with asyncio.timeout(15):  # the worker's poll (0.5 s) finds them
            await inngest.received(3)
        assert sorted(inngest.accepted_ids) == sorted(ids)
    finally:
        api.stop()
        assert worker.stop() == 0


async def test_sigterm_lets_the_in_flight_send_finish(
    tmp_path: Path, env: dict[str, str], inngest: StandIn
) -> None:
    service = await ServiceProcess(["serve"], env=env, cwd=tmp_path).started()
    hold = inngest.hold_requests()
    [event_id] = await post_documents(service.url, 1)
    await hold.arrived.wait()
    service.process.send_signal(signal.SIGTERM)
    await service.logged("received SIGTERM")  # shutting down, the send still in flight
    hold.release()
    code = await asyncio.to_thread(service.process.wait, 20)
    assert code == 0, service.log()
    assert (await rows(env)) == {event_id: "delivered"}


async def test_a_second_signal_exits_at_once_and_the_lease_expires(
    tmp_path: Path, env: dict[str, str], inngest: StandIn
) -> None:
    service = await ServiceProcess(["serve"], env=env, cwd=tmp_path).started()
    hold = inngest.hold_requests()
    [event_id] = await post_documents(service.url, 1)
    await hold.arrived.wait()
    service.process.send_signal(signal.SIGTERM)
    await service.logged("received SIGTERM")
    service.process.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(service.process.wait, 5)  # not the 10 s grace period
    assert code == 128 + signal.SIGTERM
    assert (await rows(env)) == {event_id: "sending"}

    # Whoever runs next takes the row once its lease (2 s) has expired.
    inngest.on_request = None
    hold.release()
    worker = ServiceProcess(["worker"], env=env, cwd=tmp_path)
    try:
        async with asyncio.timeout(15):
            await inngest.received(1)
    finally:
        worker.stop()
    assert inngest.accepted_ids == [event_id]


async def test_end_to_end_failures_kill_and_restart_lose_nothing(
    tmp_path: Path, env: dict[str, str], inngest: StandIn
) -> None:
    # Inngest fails for a while: errors, a dropped connection, a rate limit.
    inngest.retry_after = "1"
    for fault in (Fault.ERROR_500, Fault.DROP, Fault.ERROR_503, Fault.RATE_LIMIT, Fault.ERROR_500):
        inngest.fail_next(fault)
    acknowledged: list[str] = []
    enough = asyncio.Event()
    service = await ServiceProcess(["serve"], env=env, cwd=tmp_path).started()

    async def post(http: aiohttp.ClientSession, i: int) -> None:
        async with http.post(f"{service.url}/api", json={"documentName": f"d{i}"}) as response:
            if response.status == 200:
                acknowledged.append((await response.json())["id"])
                if len(acknowledged) >= 150:
                    enough.set()

    async with http_session(connector=aiohttp.TCPConnector(limit=16)) as http:
        await log_in(http, service.url)
        posts = [asyncio.create_task(post(http, i)) for i in range(300)]
        async with asyncio.timeout(60):
            await enough.wait()
        service.kill()
        accepted_before_kill = set(inngest.accepted_ids)
        await asyncio.gather(*posts, return_exceptions=True)

    restarted = await ServiceProcess(["serve"], env=env, cwd=tmp_path).started()
    try:
        acknowledged += await post_documents(restarted.url, 20)
        async with asyncio.timeout(60):
            await inngest.wait_until(lambda s: set(acknowledged) <= set(s.accepted_ids))
    finally:
        assert restarted.stop() == 0
    statuses = await rows(env)
    assert all(statuses[i] == "delivered" for i in acknowledged)
    # Re-sent only what may have been in flight at the kill; Inngest
    # de-duplicates those by id.
    twice = {i for i, n in inngest.accepted_counts().items() if n > 1}
    assert twice <= accepted_before_kill
    assert max(inngest.accepted_counts().values()) <= 2


async def test_two_worker_processes_share_the_outbox_without_sending_a_row_twice(
    tmp_path: Path, env: dict[str, str], inngest: StandIn
) -> None:
    small_batches = {**env, "WORKER_BATCH_SIZE": "5"}
    workers = [ServiceProcess(["worker"], env=small_batches, cwd=tmp_path) for _ in range(2)]
    for worker in workers:
        await worker.logged("delivering to")  # both running before any row exists
    api = await ServiceProcess(["serve", "--no-worker"], env=env, cwd=tmp_path).started()
    try:
        ids = await post_documents(api.url, 60)
        async with asyncio.timeout(30):
            await inngest.received(60)
    finally:
        api.stop()
        for worker in workers:
            assert worker.stop() == 0, worker.log()
    assert sorted(inngest.accepted_ids) == sorted(ids)
    assert max(inngest.accepted_counts().values()) == 1  # leases held: no row sent twice
    assert set((await rows(env)).values()) == {"delivered"}


async def test_a_worker_process_serves_its_metrics_and_readiness(
    tmp_path: Path, env: dict[str, str], inngest: StandIn
) -> None:
    port = free_port()
    worker = ServiceProcess(["worker", "--metrics-port", str(port)], env=env, cwd=tmp_path)
    await worker.logged("serving /metrics")
    api = await ServiceProcess(["serve", "--no-worker"], env=env, cwd=tmp_path).started()
    try:
        ids = await post_documents(api.url, 3)
        async with asyncio.timeout(20):
            await inngest.wait_until(lambda s: set(ids) <= set(s.accepted_ids))
        async with aiohttp.ClientSession() as http:
            ready = await http.get(f"http://127.0.0.1:{port}/readyz")
            assert ready.status == 200
            checks = (await ready.json())["checks"]
            assert set(checks) == {"database", "worker"}  # a worker checks no S3
            assert checks["worker"]["state"] == "ok"

            async def delivered_three() -> bool:
                # Counted when marked, a moment after Inngest answered.
                text = await (await http.get(f"http://127.0.0.1:{port}/metrics")).text()
                return "\ninngest_outbox_deliveries_total 3.0\n" in text

            await poll_until(delivered_three, wait_seconds=10)
            text = await (await http.get(f"http://127.0.0.1:{port}/metrics")).text()
        assert re.search(r"^inngest_outbox_send_batch_events_sum 3\.0$", text, re.MULTILINE)
    finally:
        api.stop()
        assert worker.stop() == 0, worker.log()
