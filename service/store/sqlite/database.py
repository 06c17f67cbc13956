"""The store on SQLite: every write of the process on the writer thread (group
commit), the intake's rows through the rows process, the hot statements on
the driver (outbox_sql.py)."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Connection

from ...models import UTCDateTime
from ..contract import Claim, HandOff, NewEvent
from ..database import Database, Done, Job, PendingSubmission, RowsRefused, T
from ..errors import DatabaseClosed
from ..submissions import write_relayed, write_submissions
from . import connection as rules
from . import outbox_sql
from .rows_process import RowsProcess
from .writer import Rows, SQLiteWriter

log = logging.getLogger(__name__)


# The most events a relay batch may hold to go through the rows process.
RELAY_ROWS_PROCESS_EVENTS = 1000


class SQLiteDatabase(Database):
    def __init__(self, url: str, *, rows_process: bool = False, **engine_kwargs: Any) -> None:
        """``rows_process``: on a file, the intake's rows are written by a
        process of their own (rows_process.py), the API's hot path."""
        super().__init__(url, **engine_kwargs)
        self._writer = SQLiteWriter(url)
        self._rows: RowsProcess | None = None
        self._rows_process = rows_process

    async def start(self) -> None:
        self._writer.start()
        path = self._writer.path
        if self._rows_process and path and path != ":memory:":
            rows = RowsProcess(
                path,
                busy_timeout_ms=rules.SQLITE_BUSY_TIMEOUT_MS,
                journal_size_limit=rules.WAL_LIMIT_BYTES,
                checkpoint_seconds=rules.CHECKPOINT_SECONDS,
                on_lost=self._recover_rows,
            )
            try:
                await rows.start()
            except Exception:
                log.exception("the SQLite rows process did not start; the writer thread writes")
            else:
                self._rows = rows

    async def write(self, job: Job[T]) -> T:
        if self._closed:
            raise DatabaseClosed()
        return await self._writer.run(job)

    def submit(self, job: Job[T], done: Done) -> None:
        """Handed to the writer thread at once: its one wake-up of the loop per
        transaction answers every request in it."""
        if self._closed:
            raise DatabaseClosed()
        self._writer.submit(job, done, asyncio.get_running_loop())

    def submit_rows(self, rows: Rows, done: Done) -> None:
        """Queue ``rows`` for the rows process, or the writer thread when it has
        none (or a test's check rides along); ``done(rows.written(), None)``
        or ``done(None, error)`` is called on this event loop once their
        transaction has ended."""
        if self._closed:
            raise DatabaseClosed()
        if self._rows is not None and self._rows.running and rows.check is None:
            self._rows.submit(rows, done)
            return
        self._writer.submit_rows(rows, done, asyncio.get_running_loop())

    def _recover_rows(self, stranded: list[tuple[Rows, Done]]) -> None:
        """The rows process died with these writes in its hands: each one is
        committed whole or not at all (one statement). The writer thread
        answers the committed ones and writes the others, so a client hears
        neither an error for rows that were kept nor "ok" for rows that were not."""
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
        """One driver statement in a committed transaction; its row count."""
        if self._closed:
            raise DatabaseClosed()
        return await self._writer.run_statement(sql, params)

    # -- the verbs ----------------------------------------------------------------

    def insert_submissions(
        self, batch: Sequence[PendingSubmission], hand_off: HandOff | None, done: Done
    ) -> None:
        answer = _refusals_named(done)
        if batch and batch[0].submission.idempotency_key is None:
            # The hot path: one statement for both rows of every submission.
            self.submit_rows(outbox_sql.SubmissionRows(batch, hand_off, self.before_commit), answer)
            return
        # Keys may be taken: a statement each, in a job.
        self.submit(
            lambda conn: write_submissions(
                conn,
                batch,
                hand_off,
                insert=sqlite.insert,
                enqueue=self.enqueue,
                before_commit=self.before_commit,
            ),
            answer,
        )

    def insert_relayed(
        self, batch: Sequence[PendingSubmission], hand_off: HandOff | None, done: Done
    ) -> None:
        answer = _refusals_named(done)

        def written(result: Any, error: BaseException | None) -> None:
            if not isinstance(error, sqlite3.IntegrityError):
                answer(result, error)
                return
            # An id the outbox holds already (a retry, an id sent twice): the
            # batch again, as a job that skips such ids and names what it wrote.
            try:
                self._insert_relayed_skipping(batch, hand_off, answer)
            except DatabaseClosed as exc:
                answer(None, exc)

        # The hot path: one statement for the batch's events and its keys' use.
        # A batch of few events goes as the intake's rows do (the rows process
        # when running); a large one to the writer thread, where it shares a
        # transaction with the worker's marks: through the rows process,
        # requests of 100 events went at a third of the thread's rate, the
        # process's long statements and the thread's marks taking turns at
        # SQLite's write lock (docs/performance.md).
        rows = outbox_sql.RelayedRows(batch, hand_off, self.before_commit)
        if sum(len(p.submission.events) for p in batch) <= RELAY_ROWS_PROCESS_EVENTS:  # type: ignore[attr-defined]
            self.submit_rows(rows, written)
            return
        if self._closed:
            raise DatabaseClosed()
        self._writer.submit_rows(rows, written, asyncio.get_running_loop())

    def _insert_relayed_skipping(
        self, batch: Sequence[PendingSubmission], hand_off: HandOff | None, done: Done
    ) -> None:
        self.submit(
            lambda conn: write_relayed(
                conn,
                batch,
                hand_off,
                insert=lambda c, rows, lease: outbox_sql.insert_relayed(
                    c.connection.driver_connection, rows, lease
                ),
                before_commit=self.before_commit,
            ),
            done,
        )

    def enqueue(
        self, conn: Connection, events: Sequence[NewEvent], hand_off: HandOff | None = None
    ) -> None:
        outbox_sql.enqueue(conn.connection.driver_connection, events, hand_off)

    def serialize(self, conn: Connection, keys: Sequence[str]) -> None:
        pass  # every write transaction holds the database's write lock already

    async def claim(
        self, *, token: str, owner: str, limit: int, now: datetime, expires_at: datetime
    ) -> Claim:
        return await self.write(
            lambda conn: outbox_sql.claim(
                conn.connection.driver_connection, token, owner, limit, now, expires_at
            )
        )

    async def mark_delivered(self, ids: Sequence[str], token: str, now: datetime) -> int:
        # Every delivery ends here: one statement on the driver, no transaction
        # of SQLAlchemy's.
        values = {"ids": ids, "token": token, "now": now}
        return await self.write_statement(*outbox_sql.delivered(values))

    def minute_of(self, column: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
        # Stored as 'YYYY-MM-DD HH:MM:SS.ffffff' in UTC: the minute is a prefix.
        return sa.type_coerce(sa.func.substr(column, 1, 16).concat(":00"), UTCDateTime())

    # -- health and life ----------------------------------------------------------

    @property
    def writer_healthy(self) -> bool:
        return self._writer.healthy

    @property
    def rows_process_lost(self) -> bool:
        """The rows process was started and has ended: the writer thread writes
        the intake's rows now (correct, but slower) until a restart."""
        return self._rows is not None and not self._rows.running and not self._closed

    async def close(self) -> None:
        self._closed = True
        if self._rows is not None:
            await self._rows.close()
        await asyncio.to_thread(self._writer.close)
        await self.engine.dispose()


def _refusals_named(done: Done) -> Done:
    """A refused row (a constraint) reaches the intake as RowsRefused."""

    def answer(result: Any, error: BaseException | None) -> None:
        if isinstance(error, sqlite3.IntegrityError | sa.exc.IntegrityError):
            refused = RowsRefused(str(error))
            refused.__cause__ = error
            error = refused
        done(result, error)

    return answer
