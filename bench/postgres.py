"""PostgreSQL benchmark: POST /api with one and with two API processes.

    .venv/bin/python -m bench.postgres [--duration 10] [--connections 64]

needs wrk. A durable PostgreSQL (fsync and synchronous_commit on) is started
on 127.0.0.1; one `worker` process delivers to a stand-in Inngest. The
reference, measured in the same run on the same server: asyncpg's raw rate
of single-row INSERTs, each its own committed transaction, from as many
concurrent connections as wrk has. Nothing is asserted except that every
acknowledged id is stored.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import subprocess
import sys
import time
import uuid

import asyncpg

from bench.load import (
    PASSWORD,
    acknowledged_ids,
    http_json,
    prepare_database,
    scratch_dir,
    service_env,
    stand_in_accepted,
    start,
    start_standin,
    stop,
    wait_delivered,
    wrk,
)
from service.store.postgres.listener import asyncpg_dsn
from tests.support.net import free_port, wait_for_port
from tests.support.postgres import start_postgres


async def raw_insert_rate(dsn: str, connections: int, seconds: float) -> float:
    pool = await asyncpg.create_pool(dsn, min_size=connections, max_size=connections)
    await pool.execute("CREATE TABLE IF NOT EXISTS raw_insert (id uuid PRIMARY KEY, payload json)")
    count = 0
    deadline = time.monotonic() + seconds

    async def insert() -> None:
        nonlocal count
        async with pool.acquire() as conn:
            while time.monotonic() < deadline:
                await conn.execute(
                    "INSERT INTO raw_insert VALUES ($1, $2)", uuid.uuid4(), '{"documentName": "x"}'
                )
                count += 1

    started = time.monotonic()
    await asyncio.gather(*(insert() for _ in range(connections)))
    rate = count / (time.monotonic() - started)
    await pool.close()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    work = scratch_dir("bench-pg-")
    server = start_postgres(durable=True)
    procs: list[subprocess.Popen] = []
    try:
        url = server.create_database()
        raw = asyncio.run(raw_insert_rate(asyncpg_dsn(url), args.connections, args.duration))
        inngest = start_standin(procs)
        env = service_env(work, inngest, DATABASE_URL=url)
        prepare_database(work, env)
        procs.append(
            start(
                ["-m", "service", "worker"],
                cwd=work,
                env={**env, "INNGEST_OUTBOX_PROFILE": "dev"},
            )
        )
        results = []
        for api_count in (1, 2):
            apis = []
            for _ in range(api_count):
                port = free_port()
                proc = start(
                    ["-m", "service", "serve", "--dev", "--no-worker"],
                    cwd=work,
                    env={**env, "PORT": str(port)},
                )
                procs.append(proc)
                wait_for_port("127.0.0.1", port, timeout=60, process=proc)
                _, cookie = http_json(
                    f"http://127.0.0.1:{port}/auth/login",
                    {"username": "bench", "password": PASSWORD},
                )
                apis.append((proc, f"http://127.0.0.1:{port}", cookie))
            dirs = [work / f"ids-{api_count}-{i}" for i in range(api_count)]
            for directory in dirs:
                directory.mkdir()
            before = stand_in_accepted(inngest)
            started = time.monotonic()
            # One wrk per API process, the connections shared between them.
            with concurrent.futures.ThreadPoolExecutor(api_count) as pool:
                futures = [
                    pool.submit(
                        wrk,
                        f"{api_url}/api",
                        duration=args.duration,
                        connections=args.connections // api_count,
                        env={"COOKIE": cookie, "IDS_DIR": str(directory)},
                    )
                    for (_, api_url, cookie), directory in zip(apis, dirs, strict=True)
                ]
                runs = [f.result() for f in futures]
            elapsed = time.monotonic() - started
            delivered = stand_in_accepted(inngest) - before
            ids = [i for directory in dirs for i in acknowledged_ids(directory)]
            drain = wait_delivered(inngest, before + len(ids))
            results.append(
                (
                    api_count,
                    sum(r.rps for r in runs),
                    max(r.p99_ms for r in runs),
                    delivered / elapsed,
                    drain,
                    len(ids),
                )
            )
            for proc, _, _ in apis:
                stop(proc)
                procs.remove(proc)
        all_ids = [line for d in work.glob("ids-*") for line in acknowledged_ids(d)]
        missing = asyncio.run(count_missing(asyncpg_dsn(url), all_ids))
    finally:
        for proc in procs:
            stop(proc)
        server.stop()
    print(
        f"PostgreSQL (durable), wrk -c{args.connections} -d{args.duration}s in total, one worker process"
    )
    print(
        f"reference: asyncpg raw single-row INSERT, {args.connections} connections: {raw:9.0f} rows/s"
    )
    for api_count, rps, p99, rate, drain, acked in results:
        print(
            f"{api_count} API process{'es' if api_count > 1 else ''}: {rps:9.0f} req/s ({rps / raw:.0%} of raw inserts), "
            f"p99 {p99:.2f} ms; delivered {rate:.0f} events/s during the run, the rest in {drain:.2f} s; {acked} acknowledged"
        )
    print(f"acknowledged ids missing from the database: {missing}")
    if missing:
        sys.exit(1)


async def count_missing(dsn: str, ids: list[str]) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        stored = {r[0] for r in await conn.fetch("SELECT event_id FROM documents")}
    finally:
        await conn.close()
    return len(set(ids) - stored)


if __name__ == "__main__":
    main()
