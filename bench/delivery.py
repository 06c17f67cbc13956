"""Delivery benchmark: drain rate to a stand-in Inngest, and commit-to-delivery latency.

    .venv/bin/python -m bench.delivery [--events 50000] [--samples 200]

1. Drain: N events are put in a fresh SQLite outbox (WAL, synchronous=FULL), a
   stand-in Inngest runs as a separate process on 127.0.0.1, and one worker
   (the service's own, with its default settings) drains the outbox. The
   baseline, measured in the same run against the same stand-in, is a bare
   aiohttp client posting the same events in the same batch sizes with no
   database at all: the ceiling the worker is compared to.
2. Latency: with the system idle, one document at a time goes through the
   group-commit writer; the time from its commit to the stand-in accepting it
   is measured (the stand-in runs in-process here so the moment of acceptance
   is seen exactly; the worker is woken by the commit, as in `serve`).

Figures are printed; nothing is asserted. Every event is checked delivered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime

import aiohttp
import sqlalchemy as sa
from aiohttp import web

from bench.load import scratch_dir
from service import auth, migrate, outbox
from service.config import Settings
from service.delivery.running import inngest_client, inngest_session
from service.delivery.worker import DeliveryWorker
from service.ids import new_event_id
from service.intake import DocumentIntake, Submission
from service.models import outbox as outbox_table
from service.store import open_database
from service.store.database import Database
from service.store.encoding import RawJSON
from tests.fakes.inngest import StandIn
from tests.support.net import free_port, wait_for_port

KEY = "bench-event-key"


def make_event(i: int, now: datetime) -> outbox.NewEvent:
    event_id = new_event_id()
    event = outbox.build_event(
        event_id=event_id,
        name="bench/document.requested",
        data={"documentName": f"reports/{i}.pdf", "pages": i % 50},
        user_id=1,
        username="bench",
        ts_ms=int(now.timestamp() * 1000),
    )
    return outbox.NewEvent(event_id, event["name"], RawJSON(json.dumps(event)), now)


async def fill(db: Database, count: int) -> list[outbox.NewEvent]:
    now = datetime.now(UTC)
    events = [make_event(i, now) for i in range(count)]
    for start in range(0, count, 5000):
        chunk = events[start : start + 5000]
        await outbox.enqueue(db, chunk)
    return events


async def baseline(url: str, events: list[outbox.NewEvent], batch: int, in_flight: int) -> float:
    """Events/s of a bare client posting pre-built arrays: no database."""
    bodies = [
        ("[" + ",".join(e.payload for e in events[i : i + batch]) + "]").encode()
        for i in range(0, len(events), batch)
    ]
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    async with aiohttp.ClientSession() as http:

        async def sender() -> None:
            while not queue.empty():
                body = queue.get_nowait()
                async with http.post(
                    f"{url}/e/{KEY}", data=body, headers={"Content-Type": "application/json"}
                ) as response:
                    assert response.status == 200, await response.text()

        started = time.perf_counter()
        await asyncio.gather(*(sender() for _ in range(in_flight)))
        return len(events) / (time.perf_counter() - started)


async def drain(settings: Settings, db: Database, count: int) -> float:
    async with inngest_session(settings) as http:
        worker = DeliveryWorker(db, inngest_client(settings, http), settings)
        started = time.perf_counter()
        task = asyncio.create_task(worker.run())
        await worker.wait_for(lambda stats: stats.delivered >= count)
        elapsed = time.perf_counter() - started
        await worker.stop()
        await task
    return count / elapsed


async def idle_latency(samples: int) -> list[float]:
    """Seconds from commit to the stand-in accepting, one event at a time, idle."""
    work = scratch_dir("bench-latency-")
    stand_in = StandIn(event_key=KEY, keep_events=False)
    runner = web.AppRunner(stand_in.app())
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    settings = Settings(
        database_url=f"sqlite+aiosqlite:///{work / 'latency.db'}",
        inngest_base_url=f"http://127.0.0.1:{port}",
        inngest_event_key=KEY,
    )
    db = open_database(settings.database_url)
    await migrate.upgrade(db.engine)
    await db.start()
    wake = asyncio.Event()
    intake = DocumentIntake(db, on_commit=lambda _n: wake.set())
    await intake.start()
    user = await auth.create_user(db, "bench", "bench-password")
    results = []
    async with inngest_session(settings) as http:
        worker = DeliveryWorker(db, inngest_client(settings, http), settings, wake=wake)
        intake.hand_off_to(worker)  # as `serve` wires them
        task = asyncio.create_task(worker.run())
        for i in range(samples):
            event = make_event(i, datetime.now(UTC))
            await intake.submit(Submission(user.id, f"doc-{i}", event))
            committed = time.perf_counter()
            await stand_in.received(i + 1)
            results.append(time.perf_counter() - committed)
            await asyncio.sleep(0.01)  # idle between samples: this measures the idle path
        intake.hand_off_to(None)
        await worker.stop()
        await task
    await intake.close()
    await db.close()
    await runner.cleanup()
    return results


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args()

    work = scratch_dir("bench-delivery-")
    port = free_port()
    # A process of its own: the stand-in must not share the worker's core.
    stand_in = subprocess.Popen(  # noqa: ASYNC220 - started once, before any timing
        [sys.executable, "-m", "bench.standin", "--port", str(port), "--key", KEY]
    )
    try:
        await asyncio.to_thread(wait_for_port, "127.0.0.1", port, timeout=30, process=stand_in)
        url = f"http://127.0.0.1:{port}"
        settings = Settings(
            database_url=f"sqlite+aiosqlite:///{work / 'bench.db'}",
            inngest_base_url=url,
            inngest_event_key=KEY,
        )
        db = open_database(settings.database_url)
        await migrate.upgrade(db.engine)
        await db.start()

        events = await fill(db, args.events)
        base_rate = await baseline(
            url, events, settings.worker_batch_size, settings.worker_max_in_flight
        )
        rate = await drain(settings, db, args.events)
        async with db.engine.connect() as conn:
            delivered = await conn.scalar(
                sa.select(sa.func.count()).where(outbox_table.c.status == "delivered")
            )
        assert delivered == args.events, f"only {delivered} of {args.events} delivered"

        await db.close()
        lat = await idle_latency(args.samples)
    finally:
        stand_in.terminate()
        stand_in.wait()

    print(f"events drained           {args.events}")
    print(f"baseline (bare client)   {base_rate:10.0f} events/s")
    print(f"worker drain             {rate:10.0f} events/s  ({rate / base_rate:.0%} of baseline)")
    print(
        f"commit to delivery, idle p50 {statistics.median(lat) * 1000:.2f} ms, "
        f"p99 {percentile(lat, 99) * 1000:.2f} ms  ({len(lat)} samples)"
    )


if __name__ == "__main__":
    asyncio.run(main())
