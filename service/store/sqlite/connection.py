"""SQLite's connection rules, in one place: the pragmas every connection gets,
BEGIN as we mean it, the busy wait, the WAL's bounds, and the JSON-rows
statements the hot paths write with."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncEngine

from .busy import while_busy

T = TypeVar("T")

SQLITE_BUSY_TIMEOUT_MS = 5000
# How often the checkpointer copies the WAL into the database file, and how
# large the WAL may grow before it is started again from its beginning (see
# SQLiteWriter._checkpoint). Read when a writer is made (tests change them).
# Often, so that the RESTART checkpoint, which holds the write lock while it
# copies what was written since the last one and syncs the file, has little to
# copy: at 0.5 s it held the lock up to 19 ms under load (every request in
# flight waited: p99 over 20 ms, up to 56, in 11 of 42 2 s windows), at 0.1 s
# 2.3 ms on average, 6.5 at most (p99 under 12.5 ms in all 28).
CHECKPOINT_SECONDS = 0.1
WAL_LIMIT_BYTES = 64 * 1024 * 1024
MIN_SQLITE = (3, 35, 0)
BEGIN_OPTION = "sqlite_begin"
IMMEDIATE_POLLING = "IMMEDIATE, polling"


def sqlite_time(value: datetime) -> str:
    """A UTC timestamp as SQLAlchemy stores it in SQLite (text that sorts in time order)."""
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    # Half the time of astimezone(), replace() and isoformat() (3.0 against
    # 1.5 us): it runs for every request on the event loop.
    return value.isoformat(" ", "microseconds")[:-6]  # less "+00:00"


def check_version() -> None:
    """The writer's statements need RETURNING and the JSON functions."""
    if sqlite3.sqlite_version_info < MIN_SQLITE:
        raise RuntimeError(
            f"SQLite {sqlite3.sqlite_version} is too old: RETURNING needs 3.35 or newer"
        )
    if not _has_json1():
        raise RuntimeError(
            f"SQLite {sqlite3.sqlite_version} was built without its JSON functions,"
            " which the writer needs"
        )


def _has_json1() -> bool:
    with contextlib.closing(sqlite3.connect(":memory:")) as conn:
        try:
            conn.execute("SELECT json_extract('[1]', '$[0]')")
        except sqlite3.OperationalError:
            return False
    return True


def json_rows(rows: Iterable[Sequence[object]]) -> str:
    """Rows as one JSON array: a statement over ``json_each(?)`` writes them all.

    The writer thread's statements, not executemany: every step of a SQLite
    statement releases the GIL and must take it back, and while the event loop
    is busy each take can wait up to the interpreter's switch interval. A
    transaction of a hundred rows by executemany spent most of its time waiting
    there; one statement per table waits a couple of times.

    Text, not bytes: SQLite 3.45 and newer read a BLOB argument of the JSON
    functions as its binary JSONB format.
    """
    return orjson.dumps(list(rows)).decode()


def insert_json_rows_sql(
    table: str, columns: Sequence[str], fixed: Mapping[str, str] | None = None
) -> str:
    """An INSERT of the rows given by json_rows in its last parameter: element i
    of each row goes to ``columns[i]``; ``fixed`` gives other columns an SQL
    expression each (a literal, or ? for a parameter before the rows)."""
    fixed = fixed or {}
    extracts = [f"json_extract(value, '$[{i}]')" for i in range(len(columns))]
    return (
        f"INSERT INTO {table} ({', '.join([*columns, *fixed])})"
        f" SELECT {', '.join([*extracts, *fixed.values()])} FROM json_each(?)"
    )


def restart_wal(conn: sqlite3.Connection) -> None:
    """A RESTART checkpoint without a busy handler: holding the write lock, it
    would wait for readers, and the writer with it."""
    conn.execute("PRAGMA busy_timeout=0")
    try:
        conn.execute("PRAGMA wal_checkpoint(RESTART)")
    finally:
        conn.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")


def configure(engine: AsyncEngine, *, foreign_keys: bool) -> None:
    configure_sync(engine.sync_engine, foreign_keys=foreign_keys)


def configure_sync(sync_engine: Engine, *, foreign_keys: bool) -> None:
    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # pysqlite's legacy transaction handling issues BEGIN lazily and
        # implicitly; we issue BEGIN ourselves in the "begin" hook below.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk before we acknowledge; an accepted
            # event survives a power loss, not only a killed process.
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            # A WAL started again from its beginning is cut back to this size
            # (SQLiteWriter._checkpoint): it would keep its largest size.
            cursor.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
            # Off only for migrations: batch mode rebuilds tables by copy and drop.
            cursor.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
        finally:
            cursor.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(connection: Connection) -> None:
        mode = connection.get_execution_options().get(BEGIN_OPTION, "DEFERRED")
        if mode != IMMEDIATE_POLLING:
            connection.exec_driver_sql(f"BEGIN {mode}")
        elif not _begin_polling(connection.connection.driver_connection):
            # Once more through SQLAlchemy, for its error (the caller's to handle).
            connection.exec_driver_sql("BEGIN IMMEDIATE")


def wait_while_busy(attempt: Callable[[], T]) -> T:
    """``attempt()``, tried again every few hundred microseconds while another
    process (a worker beside the API, the rows process) holds the write lock;
    its error once the lock is still taken at busy_timeout's deadline, or at
    once if another (busy.while_busy says why not SQLite's busy handler).
    """
    return while_busy(attempt, SQLITE_BUSY_TIMEOUT_MS / 1000)


def _begin_polling(raw: sqlite3.Connection) -> bool:
    """BEGIN IMMEDIATE (see wait_while_busy); False if it did not begin."""
    try:
        wait_while_busy(lambda: raw.execute("BEGIN IMMEDIATE"))
    except sqlite3.OperationalError:
        return False
    return True
