"""The process's database: ``engine`` for reads, ``write()`` for writes.

Reads go through one AsyncEngine (aiosqlite or asyncpg). Writes go through
``Database.write(job)``, where a job is a plain function of a SQLAlchemy
Connection run inside a transaction:

- On SQLite, every write of the process runs on ONE thread with ONE
  connection (sqlite/writer.py), the intake's rows through a process of their
  own (sqlite/rows_process.py).
- On PostgreSQL, a job runs in a transaction of its own on the async engine;
  the server handles concurrent writers.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from .encoding import dumps
from .errors import DatabaseClosed
from .sqlite import connection as sqlite_rules
from .sqlite.rows_process import RowsProcess
from .sqlite.writer import Done, Rows, SQLiteWriter

log = logging.getLogger(__name__)
T = TypeVar("T")
Job = Callable[[Connection], T]


def create_engine(url: str, *, foreign_keys: bool = True, **kwargs: Any) -> AsyncEngine:
    engine = create_async_engine(
        url,
        json_serializer=dumps,
        json_deserializer=json.loads,
        # Statement parameters hold documents, events and password hashes:
        # keep them out of error messages and so out of the logs.
        hide_parameters=True,
        **kwargs,
    )
    if engine.dialect.name == "sqlite":
        sqlite_rules.check_version()
        sqlite_rules.configure(engine, foreign_keys=foreign_keys)
    return engine


class Database:
    """The process's database: ``engine`` for reads, ``write()`` for writes."""

    def __init__(self, url: str, *, rows_process: bool = False, **engine_kwargs: Any) -> None:
        """``rows_process``: on a SQLite file, submit_rows() writes through a
        process of its own (see sqlite/rows_process.py), the API's hot path."""
        self.url = url
        self.engine = create_engine(url, **engine_kwargs)
        self._writer = SQLiteWriter(url) if self.engine.dialect.name == "sqlite" else None
        self._rows: RowsProcess | None = None
        self._rows_process = rows_process
        self._closed = False
        self._submitted: set[asyncio.Task[Any]] = set()  # PostgreSQL: submit()'s writes

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    async def start(self) -> None:
        if self._writer is not None:
            self._writer.start()
            path = self._writer.path
            if self._rows_process and path and path != ":memory:":
                rows = RowsProcess(
                    path,
                    busy_timeout_ms=sqlite_rules.SQLITE_BUSY_TIMEOUT_MS,
                    journal_size_limit=sqlite_rules.WAL_LIMIT_BYTES,
                    on_lost=self._recover_rows,
                )
                try:
                    await rows.start()
                except Exception:
                    log.exception("the SQLite rows process did not start; the writer thread writes")
                else:
                    self._rows = rows

    async def write(self, job: Job[T]) -> T:
        """Run ``job`` in a committed transaction; raise what it raised (nothing kept)."""
        if self._closed:
            raise DatabaseClosed()
        if self._writer is not None:
            return await self._writer.run(job)
        async with self.engine.begin() as conn:
            return await conn.run_sync(job)

    def submit(self, job: Job[T], done: Done) -> None:
        """``write`` without a task or a future: ``done(result, error)`` is called on
        this event loop once the transaction has ended. (The intake's path: on
        SQLite it hands the job to the writer thread at once, and the writer's
        one wake-up of the loop per transaction answers every request in it.)"""
        if self._closed:
            raise DatabaseClosed()
        loop = asyncio.get_running_loop()
        if self._writer is not None:
            self._writer.submit(job, done, loop)
            return
        task = loop.create_task(self.write(job))
        self._submitted.add(task)
        task.add_done_callback(lambda t: self._finish_submitted(t, done))

    def submit_rows(self, rows: Rows, done: Done) -> None:
        """SQLite only: queue ``rows`` for the writer; ``done(rows.written(), None)``
        or ``done(None, error)`` is called on this event loop once their
        transaction has ended."""
        if self._closed:
            raise DatabaseClosed()
        if self._writer is None:
            raise RuntimeError("submit_rows is for SQLite; use submit()")
        if self._rows is not None and self._rows.running and rows.check is None:
            self._rows.submit(rows, done)
            return
        self._writer.submit_rows(rows, done, asyncio.get_running_loop())

    def _recover_rows(self, stranded: list[tuple[Rows, Done]]) -> None:
        """The rows process died with these writes in its hands: each one is
        committed whole or not at all (one statement). The writer thread
        answers the committed ones and writes the others, so a client hears
        neither an error for rows that were kept nor "ok" for rows that were not."""
        assert self._writer is not None
        loop = asyncio.get_running_loop()
        for rows, done in stranded:

            def recover(conn: Connection, rows: Rows = rows) -> Any:
                raw = conn.connection.driver_connection
                if not rows.committed(raw):
                    for statement in rows.setup:  # IF NOT EXISTS; kept as the job commits
                        raw.execute(statement)
                    raw.execute(rows.sql, ("[" + ",".join(rows.take()) + "]", *rows.params))
                return rows.written()

            try:
                self._writer.submit(recover, done, loop)
            except DatabaseClosed as exc:
                done(None, exc)

    async def write_statement(self, sql: str, params: tuple[Any, ...]) -> int:
        """SQLite only: run one driver statement in a committed transaction; its row count."""
        if self._closed:
            raise DatabaseClosed()
        if self._writer is None:
            raise RuntimeError("write_statement is for SQLite; use write()")
        return await self._writer.run_statement(sql, params)

    def _finish_submitted(self, task: asyncio.Task[Any], done: Done) -> None:
        self._submitted.discard(task)
        if task.cancelled():
            done(None, DatabaseClosed())
        elif (error := task.exception()) is not None:
            done(None, error)
        else:
            done(task.result(), None)

    @property
    def writer_healthy(self) -> bool:
        return self._writer is None or self._writer.healthy

    @property
    def rows_process_lost(self) -> bool:
        """The SQLite rows process was started and has ended: the writer thread
        writes the intake's rows now (correct, but slower) until a restart."""
        return self._rows is not None and not self._rows.running and not self._closed

    async def close(self) -> None:
        self._closed = True
        if self._rows is not None:
            await self._rows.close()
        if self._writer is not None:
            await asyncio.to_thread(self._writer.close)
        await self.engine.dispose()

    async def __aenter__(self) -> Database:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
