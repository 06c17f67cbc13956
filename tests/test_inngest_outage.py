"""Inngest's queue fails for seconds under load, as its server answers then (400
``{"ids": [""], ...}``): a real `serve` keeps every acknowledged event and
delivers each once Inngest takes events again."""

from __future__ import annotations

import asyncio
import collections
import time
from pathlib import Path

import pytest

from tests.fakes.inngest import StandIn
from tests.support.service import ServiceProcess, http_session, log_in, poll_until, query

pytestmark = pytest.mark.slow

CLIENTS = 8
MAX_REQUESTS = 4000  # the load is bounded in count as well as in time
# The outage's share of the bound: the rest is the load after the recovery,
# however many requests a fast machine gets acknowledged during the outage.
OUTAGE_REQUESTS = 3000
OUTAGE_SECONDS = 5
REFUSALS = 20  # and the queue has refused at least this many sends


async def post_until(
    url: str, stop: asyncio.Event, recovered: asyncio.Event, acknowledged: list[str]
) -> None:
    async with http_session() as http:
        await log_in(http, url)
        n = 0
        while not stop.is_set() and len(acknowledged) < MAX_REQUESTS:
            if len(acknowledged) >= OUTAGE_REQUESTS and not recovered.is_set():
                await recovered.wait()
                continue
            response = await http.post(f"{url}/api", json={"documentName": f"d{n}"})
            assert response.status == 200, await response.text()
            acknowledged.append((await response.json())["id"])
            n += 1


async def test_a_queue_outage_under_load_loses_and_fails_nothing(
    tmp_path: Path, any_service_env: dict[str, str], inngest: StandIn
) -> None:
    env = {
        **any_service_env,
        "INNGEST_BASE_URL": inngest.base_url,  # type: ignore[attr-defined]
        "INNGEST_EVENT_KEY": inngest.event_key,
        "RETRY_BASE_SECONDS": "0.05",
        "RETRY_CAP_SECONDS": "0.5",
        "RETRY_MAX_ATTEMPTS": "1000",
        "WORKER_POLL_SECONDS": "0.5",
    }
    inngest.queue_down = True
    api = await ServiceProcess(["serve"], env=env, cwd=tmp_path).started()
    acknowledged: list[str] = []
    stop, recovered = asyncio.Event(), asyncio.Event()
    try:
        async with asyncio.timeout(120):
            clients = [
                asyncio.create_task(post_until(api.url, stop, recovered, acknowledged))
                for _ in range(CLIENTS)
            ]
            started = time.monotonic()
            # The outage's length is the scenario, not a wait for something.
            await asyncio.sleep(OUTAGE_SECONDS)
            await inngest.wait_until(lambda s: s.queue_refusals >= REFUSALS)
            outage = time.monotonic() - started
            during = len(acknowledged)
            assert inngest.accepted == []  # nothing got through the outage
            inngest.queue_down = False
            recovered.set()
            # Load goes on after the recovery, then stops.
            await inngest.wait_until(lambda s: s.accepted_count >= during + 50)
            stop.set()
            await asyncio.gather(*clients)
            await inngest.wait_until(lambda s: set(acknowledged) <= set(s.accepted_ids))

        async def settled() -> bool:
            states = await query(env, "SELECT count(*) FROM outbox WHERE status <> 'delivered'")
            return states == [(0,)]

        await poll_until(settled)  # the marks follow Inngest's answers
        rows = dict(await query(env, "SELECT id, status FROM outbox"))
    finally:
        stop.set()
        recovered.set()
        api.stop()

    counts = collections.Counter(inngest.accepted_ids)
    duplicates = sum(n - 1 for n in counts.values())
    print(
        f"outage {outage:.1f} s: acknowledged {len(acknowledged)} ({during} during it), "
        f"queue refusals {inngest.queue_refusals}, delivered "
        f"{sum(s == 'delivered' for s in rows.values())}, failed "
        f"{sum(s == 'failed' for s in rows.values())}, duplicates {duplicates}"
    )
    assert during > 0
    assert sorted(rows) == sorted(acknowledged)
    assert set(rows.values()) == {"delivered"}  # none failed, none left behind
    assert set(counts) == set(acknowledged)  # each delivered under its own id
    assert duplicates == 0
