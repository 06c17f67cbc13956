"""The SQLite writer: one thread and one connection for every write of the
process (group commit), and the checkpointer that keeps the WAL bounded.

Jobs that arrive while a transaction commits share the next one (one fsync
for all of them), each in its own SAVEPOINT so that one failing job fails
alone. The process's writers never meet at SQLite's lock, whose busy handler
sleeps between tries, and a transaction costs one hand-off to the thread, not
one per statement. The hottest writes skip SQLAlchemy: Rows (rows for one
INSERT, merged with the same INSERT's other rows queued) and statements (one
statement and its row count) run on the driver. When nothing else is queued
with them, each such statement is a transaction of its own, without BEGIN and
COMMIT (autocommit), answered as soon as it ends; beside SQLAlchemy jobs they
share the jobs' transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.pool import StaticPool

from ..encoding import dumps
from ..errors import DatabaseClosed
from . import connection as rules
from .busy import is_busy
from .wal_restart import WalRestarts

log = logging.getLogger(__name__)
T = TypeVar("T")
Job = Callable[[Connection], T]


# Called on the caller's event loop with (result, None) or (None, error).
Done = Callable[[Any, BaseException | None], None]


class Rows(Protocol):
    """Rows for one INSERT over ``json_each(?)`` (see json_rows), taken on the
    writer thread when their transaction runs (or when handed to the rows
    process, Database's rows_process). Rows of the same INSERT with the
    same other parameters queued together are written by one statement: one
    step of the driver, one wait for the GIL, however many requests' rows it
    holds."""

    # The INSERT: the rows' JSON its first parameter, ``params`` the others
    # (writes are merged only when both are the same); ``setup``: statements
    # run once on the writer's connection before its first use
    # (CREATE TEMP ... IF NOT EXISTS).
    sql: str
    params: tuple[Any, ...]
    setup: Sequence[str]
    # Tests' hook: called after the INSERT, in its transaction (in a savepoint
    # then); raising undoes the INSERT and fails every write merged into it.
    check: Callable[[], None] | None

    def take(self) -> list[str]:
        """Each row's JSON array text, as of now (called again, for its rows
        alone, if a bad row fails the INSERT it shared with other writes)."""

    def written(self) -> Any:
        """The result for ``done`` once the rows of the last ``take`` are committed."""

    def committed(self, raw: sqlite3.Connection) -> bool:
        """Whether the rows of the last ``take`` are in the database (asked of a
        write the rows process had when it died: it may have committed it)."""


@dataclass(slots=True)
class _Statement:
    sql: str
    params: tuple[Any, ...]


@dataclass(slots=True)
class _Queued:
    job: Job[Any] | None
    # The caller waits on a future (run), or is called back (submit).
    future: asyncio.Future[Any] | None
    loop: asyncio.AbstractEventLoop
    done: Done | None = None
    # Instead of a job: rows to merge into one INSERT, or one statement.
    rows: Rows | None = None
    statement: _Statement | None = None

    def abandoned(self) -> bool:
        return self.future is not None and self.future.cancelled()

    def settle(self, result: Any, error: BaseException | None) -> None:
        if self.done is not None:
            self.done(result, error)
        elif self.future is None or self.future.done():
            pass
        elif error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(result)


class SQLiteWriter:
    """One thread and one connection for every write of this process."""

    def __init__(self, url: str, *, max_jobs_per_transaction: int = 1024) -> None:
        sync_url = make_url(url).set(drivername="sqlite+pysqlite")
        self._engine: Engine = sa.create_engine(
            sync_url,
            json_serializer=dumps,
            json_deserializer=json.loads,
            hide_parameters=True,
            poolclass=StaticPool,
            connect_args={"check_same_thread": False},
        )
        rules.configure_sync(self._engine, foreign_keys=True)

        @event.listens_for(self._engine, "connect")
        def _writer_connection(dbapi_connection: Any, _record: Any) -> None:
            # The checkpointer thread copies the WAL into the database file;
            # a commit never waits for that copy and its fsync.
            dbapi_connection.execute("PRAGMA wal_autocheckpoint=0")
            # BEGIN, or a lone statement, waits for another process's writer
            # itself (_while_busy). Only in WAL mode, where
            # nothing after BEGIN IMMEDIATE can find the database busy (a file
            # system without WAL keeps SQLite's waits).
            (mode,) = dbapi_connection.execute("PRAGMA journal_mode").fetchone()
            if mode == "wal":
                dbapi_connection.execute("PRAGMA busy_timeout=0")

        self._path = make_url(url).database or ""
        self._checkpoint_seconds = rules.CHECKPOINT_SECONDS
        self._wal_limit = rules.WAL_LIMIT_BYTES
        self._restarts = (
            WalRestarts(self._path, self._wal_limit, self._checkpoint_seconds)
            if self._path and self._path != ":memory:"
            else None
        )
        self._stopped = threading.Event()
        self._checkpointer: threading.Thread | None = None
        self._write = self._engine.execution_options(
            **{rules.BEGIN_OPTION: rules.IMMEDIATE_POLLING}
        )
        self._jobs: queue.SimpleQueue[_Queued | None] = queue.SimpleQueue()
        self._max = max_jobs_per_transaction
        self._thread: threading.Thread | None = None
        self._closed = False
        self._broken: BaseException | None = None
        # Makes "check closed, then queue" atomic with close()'s stop marker.
        self._queue_lock = threading.Lock()
        self._set_up: set[str] = set()  # Rows.sql whose setup has run
        self.transactions = 0

    @property
    def path(self) -> str:
        """The database file's path ("" or ":memory:" for none)."""
        return self._path

    @property
    def healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._broken is None

    def start(self) -> None:
        # Opened here, not on the thread: a database that cannot be opened
        # fails the start-up, loudly, instead of a writer that never answers.
        conn = self._write.connect()
        self._thread = threading.Thread(
            target=self._serve, args=(conn,), name="sqlite-writer", daemon=True
        )
        self._thread.start()
        if self._path and self._path != ":memory:":
            self._checkpointer = threading.Thread(
                target=self._checkpoint, name="sqlite-checkpointer", daemon=True
            )
            self._checkpointer.start()

    def _checkpoint(self) -> None:
        """PASSIVE checkpoints every so often: they never block the writer.

        A checkpoint copies the WAL into the database file, but the WAL is
        written from its beginning again only when a write starts with all of
        it copied, which under steady load never happens: it grew by 1.6 GB in
        90 s of bench.load, and the memory mapped for its index with it. Past
        rules.WAL_LIMIT_BYTES, a RESTART checkpoint follows the PASSIVE one: it takes
        the write lock if it is free (without a busy handler it neither waits
        for it nor for readers), copies the little written since, and the next
        write starts the WAL again; journal_size_limit then trims the file.
        The writer waits for it as for another process's writer (_while_busy).
        Under steady writes the lock is seldom free: the writers then run the
        RESTART themselves between commits (wal_restart.py).
        """
        conn = sqlite3.connect(self._path, check_same_thread=False)
        try:
            page_size = 0
            while not self._stopped.wait(self._checkpoint_seconds):
                try:
                    if not page_size:
                        conn.execute(f"PRAGMA busy_timeout={rules.SQLITE_BUSY_TIMEOUT_MS}")
                        conn.execute("PRAGMA synchronous=FULL")
                        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
                    _, frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    if frames * page_size > self._wal_limit:
                        rules.restart_wal(conn)
                except sqlite3.Error as exc:
                    if not is_busy(exc):  # busy: the next round
                        log.warning("WAL checkpoint failed: %s", exc)
        finally:
            conn.close()

    async def run(self, job: Job[T]) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue(_Queued(job, future, loop))
        return await future

    def submit(self, job: Job[Any], done: Done, loop: asyncio.AbstractEventLoop) -> None:
        """Queue ``job``; ``done`` is called on ``loop`` once its transaction ends."""
        self._queue(_Queued(job, None, loop, done))

    def submit_rows(self, rows: Rows, done: Done, loop: asyncio.AbstractEventLoop) -> None:
        self._queue(_Queued(None, None, loop, done, rows=rows))

    async def run_statement(self, sql: str, params: tuple[Any, ...]) -> int:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        self._queue(_Queued(None, future, loop, statement=_Statement(sql, params)))
        return await future

    def _queue(self, queued: _Queued) -> None:
        with self._queue_lock:
            if self._closed or self._broken is not None or self._thread is None:
                raise DatabaseClosed()
            self._jobs.put(queued)

    def close(self) -> None:
        """Finish what is queued, then stop the thread (blocking)."""
        with self._queue_lock:
            if self._closed:
                return
            self._closed = True
            if self._thread is not None:
                self._jobs.put(None)
        if self._thread is not None:
            self._thread.join()
        self._fail_queued(DatabaseClosed())
        self._stopped.set()
        if self._checkpointer is not None:
            self._checkpointer.join()
        self._engine.dispose()

    def _serve(self, conn: Connection) -> None:
        try:
            self._serve_jobs(conn)
        except BaseException as exc:  # the writer must never die silently
            log.critical("the SQLite writer thread failed; writes are refused", exc_info=exc)
            with self._queue_lock:
                self._broken = exc
            self._fail_queued(DatabaseClosed())
        finally:
            conn.close()

    def _fail_queued(self, error: BaseException) -> None:
        failed: list[tuple[_Queued, Any, BaseException | None]] = []
        while True:
            try:
                queued = self._jobs.get_nowait()
            except queue.Empty:
                break
            if queued is not None:
                failed.append((queued, None, error))
        _settle_threadsafe(failed)

    def _serve_jobs(self, conn: Connection) -> None:
        while True:
            first = self._jobs.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < self._max:
                try:
                    queued = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if queued is None:
                    stop = True
                    break
                batch.append(queued)
            self._transact(conn, batch)
            if self._restarts is not None:
                try:
                    self._restarts.after_commit(conn.connection.driver_connection)
                except Exception as exc:  # an invalidated connection: the next job finds out
                    log.warning("WAL restart skipped: %s", exc)
            if stop:
                return

    def _transact(self, conn: Connection, batch: list[_Queued]) -> None:
        # A job whose caller gave up before it started is not run.
        batch = [q for q in batch if not q.abandoned()]
        if not batch:
            return
        if all(q.job is None for q in batch):
            self._write_statements(conn.connection.driver_connection, batch)
            return
        outcomes: list[tuple[_Queued, Any, BaseException | None]] = []
        try:
            self._run_batch(conn, batch, outcomes)
        except Exception as exc:
            # BEGIN or COMMIT failed (disk full, I/O error): nothing was kept.
            log.error("SQLite transaction of %d jobs failed: %s", len(batch), exc)
            outcomes = [(queued, None, exc) for queued in batch]
        except BaseException as exc:
            self._going_down(exc, batch)
            raise
        else:
            self.transactions += 1
        _settle_threadsafe(outcomes)

    def _going_down(self, exc: BaseException, unanswered: list[_Queued]) -> None:
        """The thread is going down: no caller may wait forever."""
        with self._queue_lock:
            self._broken = exc
        _settle_threadsafe([(queued, None, DatabaseClosed()) for queued in unanswered])

    def _write_statements(self, raw: sqlite3.Connection, batch: list[_Queued]) -> None:
        """Driver writes only: each statement (all the rows for one INSERT
        merged) a transaction of its own, without BEGIN and COMMIT, and answered
        as soon as it ends: the fewest waits for the GIL. The intake's rows go
        first, as requests wait for them."""
        units = _statements(batch)
        try:
            self._prepare(raw, batch)
        except Exception as exc:
            log.error("SQLite writer could not prepare %d writes: %s", len(batch), exc)
            _settle_threadsafe([(queued, None, exc) for queued in batch])
            return
        for i, unit in enumerate(units):
            outcomes: list[tuple[_Queued, Any, BaseException | None]] = []
            try:
                hooked = any(q.rows is not None and q.rows.check is not None for q in unit)
                if hooked or not self._run_autocommit(raw, unit, outcomes):
                    # A tests' hook needs a savepoint, and a failed statement
                    # runs again in a transaction that reports each write's
                    # own outcome.
                    outcomes = []
                    self._run_in_transaction(raw, unit, outcomes)
            except Exception as exc:
                log.error("SQLite transaction of %d writes failed: %s", len(unit), exc)
                outcomes = [(queued, None, exc) for queued in unit]
            except BaseException as exc:
                self._going_down(exc, [queued for later in units[i:] for queued in later])
                raise
            else:
                self.transactions += 1
            _settle_threadsafe(outcomes)

    def _prepare(self, raw: sqlite3.Connection, direct: list[_Queued]) -> None:
        if raw.in_transaction:
            # A transaction left open by a COMMIT and a ROLLBACK that both
            # failed: what follows must not run (and be answered) inside it.
            raw.execute("ROLLBACK")
        self._set_up_rows(raw, direct)

    def _run_in_transaction(
        self,
        raw: sqlite3.Connection,
        direct: list[_Queued],
        outcomes: list[tuple[_Queued, Any, BaseException | None]],
    ) -> None:
        """BEGIN, the statements and COMMIT, on the driver."""
        rules.wait_while_busy(lambda: raw.execute("BEGIN IMMEDIATE"))
        try:
            self._run_direct(raw, direct, outcomes)
            raw.execute("COMMIT")
        except BaseException:
            if raw.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    raw.execute("ROLLBACK")
            raise

    def _run_batch(
        self,
        conn: Connection,
        batch: list[_Queued],
        outcomes: list[tuple[_Queued, Any, BaseException | None]],
    ) -> None:
        """One transaction for a batch with jobs in it. Driver writes first,
        each one statement (atomic by itself: a failing one undoes only its own
        work); then the jobs, each in a savepoint of its own when it shares the
        transaction."""
        raw = conn.connection.driver_connection
        direct = [q for q in batch if q.job is None]
        jobs = [q for q in batch if q.job is not None]
        self._prepare(raw, direct)
        if not direct and len(jobs) == 1:
            # Alone in its transaction, a job needs no savepoint: its failure
            # rolls back the transaction, which held nothing else.
            self._run_alone(conn, jobs[0], outcomes)
            return
        # Savepoints on the driver connection: SQLAlchemy's nested transaction
        # objects cost more than the statements they issue.
        with conn.begin():
            self._run_direct(raw, direct, outcomes)
            for queued in jobs:
                assert queued.job is not None
                raw.execute("SAVEPOINT job")
                try:
                    result = queued.job(conn)
                except Exception as exc:
                    try:
                        raw.execute("ROLLBACK TO job")
                        raw.execute("RELEASE job")
                    except Exception as rollback_error:
                        # SQLite rolled the whole transaction back (disk full,
                        # I/O error): report the cause, not the lost savepoint.
                        raise exc from rollback_error
                    outcomes.append((queued, None, exc))
                else:
                    raw.execute("RELEASE job")
                    outcomes.append((queued, result, None))

    def _set_up_rows(self, raw: sqlite3.Connection, direct: list[_Queued]) -> None:
        """Each Rows' setup, once, outside any transaction: a rollback would
        undo TEMP objects created in it."""
        for queued in direct:
            rows = queued.rows
            if rows is not None and rows.sql not in self._set_up:
                for statement in rows.setup:
                    raw.execute(statement)
                self._set_up.add(rows.sql)

    def _run_autocommit(
        self,
        raw: sqlite3.Connection,
        direct: list[_Queued],
        outcomes: list[tuple[_Queued, Any, BaseException | None]],
    ) -> bool:
        """One statement, its own transaction: no BEGIN, no COMMIT, the fewest
        waits for the GIL; tried again while another process holds the write
        lock (_while_busy), which raises past busy_timeout. False if it failed
        otherwise: nothing was written (outside a transaction a failing
        statement raises before its outcome is kept), and the caller runs it in
        a transaction, which reports each write's own outcome (there a bad row
        among merged rows fails alone)."""
        try:
            rules.wait_while_busy(lambda: self._run_direct(raw, direct, outcomes))
        except Exception as exc:
            if is_busy(exc):
                raise  # the lock held past busy_timeout: nothing was written
            return False
        return True

    def _run_direct(
        self,
        raw: sqlite3.Connection,
        direct: list[_Queued],
        outcomes: list[tuple[_Queued, Any, BaseException | None]],
    ) -> None:
        """The driver writes of a transaction (see _statements). Raises only what
        ended the transaction itself."""
        for unit in _statements(direct):
            queued = unit[0]
            if queued.rows is not None:
                self._insert_rows(raw, unit, outcomes)
                continue
            assert queued.statement is not None
            try:
                count = raw.execute(queued.statement.sql, queued.statement.params).rowcount
            except Exception as exc:
                if not raw.in_transaction:
                    raise  # disk full, I/O error: SQLite rolled everything back
                outcomes.append((queued, None, exc))
            else:
                outcomes.append((queued, count, None))

    def _insert_rows(
        self,
        raw: sqlite3.Connection,
        group: list[_Queued],
        outcomes: list[tuple[_Queued, Any, BaseException | None]],
    ) -> None:
        """One INSERT for the rows of every write in ``group`` (all the same sql)."""
        first = group[0].rows
        assert first is not None
        writes = [q.rows for q in group if q.rows is not None]
        checks = [w.check for w in writes if w.check is not None]
        texts = [row for w in writes for row in w.take()]
        if checks:
            raw.execute("SAVEPOINT rows")
        try:
            if texts:
                raw.execute(first.sql, ("[" + ",".join(texts) + "]", *first.params))
            for check in checks:
                check()
        except Exception as exc:
            if not raw.in_transaction:
                raise  # disk full, I/O error: SQLite rolled everything back
            if checks:
                raw.execute("ROLLBACK TO rows")
                raw.execute("RELEASE rows")
            if len(group) > 1 and isinstance(exc, sqlite3.IntegrityError):
                # One write's bad row must not fail the writes it shared the
                # statement with: each on its own.
                for queued in group:
                    self._insert_rows(raw, [queued], outcomes)
                return
            outcomes.extend((queued, None, exc) for queued in group)
            return
        if checks:
            raw.execute("RELEASE rows")
        outcomes.extend((q, w.written(), None) for q, w in zip(group, writes, strict=True))

    @staticmethod
    def _run_alone(
        conn: Connection,
        queued: _Queued,
        outcomes: list[tuple[_Queued, Any, BaseException | None]],
    ) -> None:
        assert queued.job is not None
        failure: Exception | None = None
        try:
            with conn.begin():
                try:
                    result = queued.job(conn)
                except Exception as exc:
                    failure = exc
                    raise
        except Exception as exc:
            if failure is None:
                raise  # BEGIN or COMMIT failed: see _transact
            if exc is not failure:
                # The rollback failed too (disk full, I/O error): report the cause.
                raise failure from exc
            outcomes.append((queued, None, failure))
            return
        outcomes.append((queued, result, None))


def _settle_threadsafe(outcomes: list[tuple[_Queued, Any, BaseException | None]]) -> None:
    by_loop: dict[asyncio.AbstractEventLoop, list[Any]] = {}
    for outcome in outcomes:
        by_loop.setdefault(outcome[0].loop, []).append(outcome)
    for loop, settled in by_loop.items():
        # One wake-up of the event loop per transaction, not one per job.
        try:
            loop.call_soon_threadsafe(_settle, settled)
        except RuntimeError:  # that loop is closed: nobody is waiting
            pass


def _settle(outcomes: list[tuple[_Queued, Any, BaseException | None]]) -> None:
    for queued, result, error in outcomes:
        try:
            queued.settle(result, error)
        except Exception:
            # One caller's failing callback must not leave the others unanswered.
            log.exception("settling a write's outcome failed")


def _statements(direct: list[_Queued]) -> list[list[_Queued]]:
    """Driver writes as statements: the rows for each INSERT and parameters
    together (first), then each statement alone."""
    inserts: dict[tuple[str, tuple[Any, ...]], list[_Queued]] = {}
    statements: list[list[_Queued]] = []
    for queued in direct:
        if queued.rows is not None:
            inserts.setdefault((queued.rows.sql, queued.rows.params), []).append(queued)
        else:
            statements.append([queued])
    return [*inserts.values(), *statements]
