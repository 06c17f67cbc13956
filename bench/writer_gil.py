"""Why the SQLite writer inserts a transaction's rows with one statement, not executemany.

    .venv/bin/python -m bench.writer_gil [--rows 50] [--transactions 40] [--switch-interval S]

Every step of a SQLite statement releases the GIL and must take it back. While
another thread runs Python (the event loop, under load), each take can wait
up to the interpreter's switch interval (Python's 5 ms; `serve` sets 0.5 ms).
executemany steps once per row; one statement per table steps a few times a
transaction; the intake's statement (a TEMP view's trigger writes both tables)
once, and needs no BEGIN and COMMIT.

Runs transactions of --rows document and outbox rows (the service's schema, a
real file, synchronous=FULL) on a thread, first alone, then beside a thread
that keeps the GIL busy, and prints each way's time per transaction and the
ratio of busy to idle. Alone, plain multi-row INSERTs cost SQLite the least;
beside a busy thread, the fewest steps win.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from service import intake
from service.cli import SWITCH_INTERVAL_SECONDS
from service.ids import new_event_id
from service.migrate import upgrade
from service.store.database import create_engine
from service.store.sqlite.connection import insert_json_rows_sql, json_rows

AT = "2026-11-23 10:00:00.000000"
PAYLOAD = '{"name":"app/document.requested","data":{"documentName":"reports/q3.pdf"},"v":"1"}'
DOCUMENTS_MANY = (
    "INSERT INTO documents (user_id, document_name, event_id, created_at) VALUES (?, ?, ?, ?)"
)
OUTBOX_MANY = (
    "INSERT INTO outbox (id, event_name, payload, status, attempts, available_at, created_at)"
    " VALUES (?, ?, ?, 'pending', 0, ?, ?)"
)
DOCUMENTS_ONE = insert_json_rows_sql(
    "documents", ("user_id", "document_name", "event_id", "created_at")
)
OUTBOX_ONE = insert_json_rows_sql(
    "outbox",
    ("id", "event_name", "payload", "available_at", "created_at"),
    {"status": "'pending'", "attempts": "0"},
)


async def create_schema(url: str) -> None:
    engine = create_engine(url)
    try:
        await upgrade(engine)
    finally:
        await engine.dispose()


def open_database(path: Path) -> tuple[sqlite3.Connection, int]:
    asyncio.run(create_schema(f"sqlite+aiosqlite:///{path}"))
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    (user_id,) = conn.execute(
        "INSERT INTO users (username, password_hash, is_admin, created_at)"
        " VALUES ('bench', 'x', 0, ?) RETURNING id",
        (AT,),
    ).fetchone()
    return conn, user_id


def by_executemany(conn: sqlite3.Connection, user_id: int, rows: int) -> None:
    ids = [new_event_id() for _ in range(rows)]
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(DOCUMENTS_MANY, [(user_id, "reports/q3.pdf", i, AT) for i in ids])
    conn.executemany(OUTBOX_MANY, [(i, "app/document.requested", PAYLOAD, AT, AT) for i in ids])
    conn.execute("COMMIT")


def by_one_statement(conn: sqlite3.Connection, user_id: int, rows: int) -> None:
    ids = [new_event_id() for _ in range(rows)]
    conn.execute("BEGIN IMMEDIATE")
    conn.execute(DOCUMENTS_ONE, (json_rows((user_id, "reports/q3.pdf", i, AT) for i in ids),))
    conn.execute(
        OUTBOX_ONE, (json_rows((i, "app/document.requested", PAYLOAD, AT, AT) for i in ids),)
    )
    conn.execute("COMMIT")


def by_values(conn: sqlite3.Connection, user_id: int, rows: int) -> None:
    """Plain multi-row INSERTs, one per table: the least work for SQLite."""
    ids = [new_event_id() for _ in range(rows)]
    conn.execute("BEGIN IMMEDIATE")
    conn.execute(
        "INSERT INTO documents (user_id, document_name, event_id, created_at) VALUES "
        + ", ".join(["(?, ?, ?, ?)"] * rows),
        [value for i in ids for value in (user_id, "reports/q3.pdf", i, AT)],
    )
    conn.execute(
        "INSERT INTO outbox (id, event_name, payload, status, attempts, available_at, created_at)"
        " VALUES " + ", ".join(["(?, ?, ?, 'pending', 0, ?, ?)"] * rows),
        [value for i in ids for value in (i, "app/document.requested", PAYLOAD, AT, AT)],
    )
    conn.execute("COMMIT")


def by_intake_statement(conn: sqlite3.Connection, user_id: int, rows: int) -> None:
    """What the service runs: the intake's one statement, in autocommit."""
    texts = json_rows(
        (user_id, "reports/q3.pdf", new_event_id(), AT, "app/document.requested", PAYLOAD)
        for _ in range(rows)
    )
    conn.execute(intake._SQLITE_INSERT, (texts, "pending", None, None, None))


def median_ms(write: Callable[[], None], transactions: int, *, busy: bool) -> float:
    stop = threading.Event()

    def spin() -> None:  # pure Python: gives the GIL up only when the interpreter forces it
        n = 0
        while not stop.is_set():
            n += 1

    spinner = threading.Thread(target=spin)
    if busy:
        spinner.start()
    times: list[float] = []

    def run() -> None:
        for _ in range(transactions):
            started = time.perf_counter()
            write()
            times.append(time.perf_counter() - started)

    writer = threading.Thread(target=run)
    writer.start()
    writer.join()
    stop.set()
    if busy:
        spinner.join()
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=50)
    parser.add_argument("--transactions", type=int, default=40)
    parser.add_argument("--switch-interval", type=float, default=SWITCH_INTERVAL_SECONDS)
    args = parser.parse_args()
    sys.setswitchinterval(args.switch_interval)
    with tempfile.TemporaryDirectory() as work:
        conn, user_id = open_database(Path(work) / "bench.db")
        for statement in intake._SQLITE_SETUP:
            conn.execute(statement)
        print(
            f"{args.rows} requests' rows a transaction, median of {args.transactions},"
            f" switch interval {args.switch_interval * 1000:g} ms:"
        )
        shapes = (
            ("executemany", by_executemany),
            ("one statement a table", by_one_statement),
            ("multi-row VALUES", by_values),
            ("the intake's statement", by_intake_statement),
        )
        for name, how in shapes:
            write = functools.partial(how, conn, user_id, args.rows)
            idle = median_ms(write, args.transactions, busy=False)
            busy = median_ms(write, args.transactions, busy=True)
            print(
                f"  {name:23} alone {idle:7.2f} ms   beside a busy thread {busy:8.2f} ms"
                f"   ({busy / idle:5.1f}x)"
            )
        conn.close()


if __name__ == "__main__":
    main()
