"""PostgreSQL benchmark: POST /api against a bare handler and procrastinate, in turns,
with what each acknowledged event costs the database.

    .venv/bin/python -m bench.postgres [--rounds 3] [--duration 5] [--connections 64] [--top 0]

needs wrk and the `bench` extra (procrastinate). A durable PostgreSQL 15
(fsync and synchronous_commit on, pg_stat_statements loaded) is started on
127.0.0.1. Four servers are up at once, each one process, and wrk (one thread)
loads each in turn for --rounds rounds, the order reversed every other round:

- bare: an aiohttp handler that parses the JSON and answers ok (bench.bare);
- procrastinate: an aiohttp-session check and a procrastinate ``defer_async``
  (bench.procrastinate_app; no procrastinate worker runs);
- in-process worker: ``inngest-outbox serve`` with its worker delivering to a
  stand-in Inngest;
- separate worker: ``serve --no-worker`` and a ``worker`` process, on a
  database of their own.

After each service's turn the benchmark waits until the stand-in has every
acknowledged event, so a turn's WAL is its own events' from request to
delivery. Each server has its own database: statements (pg_stat_statements
calls, BEGIN and COMMIT included) and transactions (pg_stat_database
xact_commit and xact_rollback, read once the servers have stopped, so that
their backends have reported them) are that database's over the whole run;
WAL bytes are pg_current_wal_lsn() before and after each turn. Each is
divided by the events acknowledged. The reference, before the rounds: asyncpg's
raw single-row INSERTs, each its own transaction, from as many connections as
wrk has. Figures are medians over the rounds; nothing is asserted except that
every acknowledged id is stored.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from bench.load import (
    HERE,
    PASSWORD,
    Run,
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

STATEMENTS = {
    "shared_preload_libraries": "pg_stat_statements",
    "pg_stat_statements.max": "10000",
}


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


@dataclass
class Target:
    name: str
    url: str
    cookie: str = ""
    database: str | None = None  # its database's name, for the cost per event
    delivers: bool = False
    processes: list[subprocess.Popen] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)
    acknowledged: int = 0
    wal_bytes: int = 0
    delivered_while_loaded: int = 0
    loaded_seconds: float = 0.0
    drain_seconds: list[float] = field(default_factory=list)
    ids_dir: Path | None = None


async def query(dsn: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


def wal_lsn(admin: str) -> int:
    rows = asyncio.run(query(admin, "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn AS at"))
    return int(rows[0]["at"])


def database_counters(admin: str, names: list[str]) -> dict[str, tuple[int, int]]:
    """(statements, transactions) so far, by database."""
    rows = asyncio.run(
        query(
            admin,
            """SELECT d.datname,
                      coalesce((SELECT sum(calls) FROM pg_stat_statements s
                                WHERE s.dbid = d.datid), 0)::bigint AS statements,
                      (d.xact_commit + d.xact_rollback)::bigint AS transactions
               FROM pg_stat_database d WHERE d.datname = any($1::text[])""",
            names,
        )
    )
    return {r["datname"]: (r["statements"], r["transactions"]) for r in rows}


def top_statements(admin: str, database: str, limit: int) -> list[tuple[int, str]]:
    rows = asyncio.run(
        query(
            admin,
            """SELECT calls, query FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
               WHERE d.datname = $1 ORDER BY calls DESC LIMIT $2""",
            database,
            limit,
        )
    )
    return [(r["calls"], " ".join(r["query"].split())[:150]) for r in rows]


def wait_disconnected(admin: str, names: list[str], timeout: float = 30) -> None:
    """Until no backend serves these databases: each reports its counts as it exits."""
    deadline = time.monotonic() + timeout
    sql = "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = any($1::text[])"
    while asyncio.run(query(admin, sql, names))[0]["n"]:
        if time.monotonic() > deadline:
            raise TimeoutError("backends still connected")
        time.sleep(0.1)
    time.sleep(0.5)  # the statistics of an exiting backend are flushed as it goes


def login(url: str, path: str, body: dict) -> str:
    return http_json(f"{url}{path}", body)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument(
        "--top", type=int, default=0, help="also print each database's N statements called most"
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench.postgres needs wrk: apt-get install wrk")
    work = scratch_dir("bench-pg-")
    server = start_postgres(durable=True, settings=STATEMENTS)
    procs: list[subprocess.Popen] = []
    admin = asyncpg_dsn(server.url())
    try:
        asyncio.run(query(admin, "CREATE EXTENSION pg_stat_statements"))
        raw = asyncio.run(
            raw_insert_rate(asyncpg_dsn(server.create_database()), args.connections, args.duration)
        )
        inngest = start_standin(procs)
        targets: list[Target] = []

        port = free_port()
        procs.append(start(["-m", "bench.bare", "--port", str(port)], cwd=HERE.parent))
        wait_for_port("127.0.0.1", port, timeout=30, process=procs[-1])
        targets.append(Target("bare aiohttp handler", f"http://127.0.0.1:{port}"))

        url = server.create_database()
        dsn = asyncpg_dsn(url)
        subprocess.run(
            [sys.executable, "-m", "bench.procrastinate_app", "--dsn", dsn, "--apply-schema"],
            cwd=HERE.parent, check=True,
        )  # fmt: skip
        port = free_port()
        procs.append(
            start(
                ["-m", "bench.procrastinate_app", "--port", str(port), "--dsn", dsn],
                cwd=HERE.parent,
            )
        )
        wait_for_port("127.0.0.1", port, timeout=30, process=procs[-1])
        base = f"http://127.0.0.1:{port}"
        targets.append(
            Target(
                "procrastinate defer_async",
                base,
                login(base, "/login", {}),
                database=url.rsplit("/", 1)[1],
                processes=[procs[-1]],
            )
        )

        for name, separate in (
            ("serve, in-process worker", False),
            ("serve + worker process", True),
        ):
            url = server.create_database()
            home = work / ("separate" if separate else "in-process")
            home.mkdir()
            env = service_env(home, inngest, DATABASE_URL=url)
            prepare_database(home, env)
            mine = []
            if separate:
                mine.append(start(["-m", "service", "worker"], cwd=home, env=env))
            port = free_port()
            mine.append(
                start(
                    ["-m", "service", "serve", "--dev", *(["--no-worker"] if separate else [])],
                    cwd=home,
                    env={**env, "PORT": str(port)},
                )
            )
            procs.extend(mine)
            wait_for_port("127.0.0.1", port, timeout=60, process=mine[-1])
            base = f"http://127.0.0.1:{port}"
            cookie = login(base, "/auth/login", {"username": "bench", "password": PASSWORD})
            targets.append(
                Target(
                    name,
                    base,
                    cookie,
                    database=url.rsplit("/", 1)[1],
                    delivers=True,
                    processes=mine,
                    ids_dir=home / "ids",
                )
            )

        databases = [t.database for t in targets if t.database]
        counters_before = database_counters(admin, databases)
        for turn in range(args.rounds):
            for target in targets if turn % 2 == 0 else reversed(targets):
                measure(target, turn, args, inngest, admin)
        for target in targets:
            for proc in target.processes:
                stop(proc)
                procs.remove(proc)
        wait_disconnected(admin, databases)
        counters_after = database_counters(admin, databases)
        tops = {d: top_statements(admin, d, args.top) for d in databases if args.top}
        missing = {
            t.name: asyncio.run(
                count_missing(asyncpg_dsn(server.url(t.database)), acknowledged_ids(t.ids_dir))
            )
            for t in targets
            if t.ids_dir is not None
        }
    finally:
        for proc in procs:
            stop(proc)
        server.stop()

    bare = statistics.median(r.rps for r in targets[0].runs)
    by_name = {t.name: t for t in targets}
    procrastinate = statistics.median(r.rps for r in by_name["procrastinate defer_async"].runs)
    print(
        f"PostgreSQL 15 (durable: fsync, synchronous_commit on), wrk -t1 -c{args.connections}, "
        f"{args.rounds} rounds of {args.duration} s in turns, medians; each server one process"
    )
    print(
        f"reference: asyncpg raw single-row INSERTs, {args.connections} connections: {raw:7.0f} rows/s"
    )
    print(
        f"{'server':<28} {'req/s':>7} {'of bare':>8} {'x procr.':>8} {'p99 ms':>7}   rounds (req/s)"
    )
    for target in targets:
        rps = statistics.median(r.rps for r in target.runs)
        p99 = statistics.median(r.p99_ms for r in target.runs)
        print(
            f"{target.name:<28} {rps:7.0f} {rps / bare:8.2f} {rps / procrastinate:8.2f} {p99:7.2f}   "
            + ", ".join(f"{r.rps:.0f}" for r in target.runs)
        )
    print("per acknowledged event, from its request to its delivery (the database's whole run):")
    for target in targets:
        if target.database is None:
            continue
        statements = counters_after[target.database][0] - counters_before[target.database][0]
        transactions = counters_after[target.database][1] - counters_before[target.database][1]
        events = max(target.acknowledged, 1)
        line = (
            f"  {target.name:<26} {statements / events:6.2f} statements, "
            f"{transactions / events:6.3f} transactions, {target.wal_bytes / events:6.0f} WAL bytes"
            f" ({target.acknowledged} events)"
        )
        if target.delivers:
            line += (
                f"; delivered {target.delivered_while_loaded / target.loaded_seconds:.0f}/s while "
                f"loaded, the rest within {max(target.drain_seconds):.2f} s"
            )
        print(line)
    for database, rows in tops.items():
        name = next(t.name for t in targets if t.database == database)
        events = max(next(t.acknowledged for t in targets if t.database == database), 1)
        print(f"  {name}: the statements called most, calls per event")
        for calls, text in rows:
            print(f"    {calls / events:7.3f}  {text}")
    print(
        "acknowledged ids missing from the database: "
        + ", ".join(f"{k} {v}" for k, v in missing.items())
    )
    if any(missing.values()):
        sys.exit(1)


def measure(target: Target, turn: int, args: argparse.Namespace, inngest: str, admin: str) -> None:
    env = {"COOKIE": target.cookie} if target.cookie else {}
    ids_dir = None
    if target.ids_dir is not None:
        ids_dir = target.ids_dir / str(turn)  # wrk names its files by thread: one dir a run
        ids_dir.mkdir(parents=True)
        env["IDS_DIR"] = str(ids_dir)
    lsn = wal_lsn(admin)
    accepted = stand_in_accepted(inngest)
    started = time.monotonic()
    run = wrk(
        f"{target.url}/api",
        duration=args.duration,
        connections=args.connections,
        env=env,
        threads=1,
    )
    target.runs.append(run)
    if target.delivers and ids_dir is not None:
        target.loaded_seconds += time.monotonic() - started
        target.delivered_while_loaded += stand_in_accepted(inngest) - accepted
        acknowledged = len(acknowledged_ids(ids_dir))
        target.drain_seconds.append(wait_delivered(inngest, accepted + acknowledged))
        target.acknowledged += acknowledged
    elif target.database is not None:
        target.acknowledged += run.ok
    target.wal_bytes += wal_lsn(admin) - lsn


async def count_missing(dsn: str, ids: list[str]) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        stored = {r[0] for r in await conn.fetch("SELECT event_id FROM documents")}
    finally:
        await conn.close()
    return len(set(ids) - stored)


if __name__ == "__main__":
    main()
