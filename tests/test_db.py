"""The database's write path: what happens when it cannot write."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from service.store import open_database
from service.store.database import Database
from service.store.errors import DatabaseClosed
from service.store.sqlite.connection import sqlite_time
from tests.support.wait import until


async def test_a_database_that_cannot_be_opened_fails_at_start(tmp_path: Path) -> None:
    db = open_database(f"sqlite+aiosqlite:///{tmp_path / 'missing-dir' / 'x.db'}")
    with pytest.raises(sa.exc.OperationalError):
        await db.start()
    await db.engine.dispose()


async def test_writes_after_close_are_refused(db: Database) -> None:
    await db.close()
    with pytest.raises(DatabaseClosed):
        await db.write(lambda conn: conn.execute(sa.text("SELECT 1")))


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_a_dead_writer_thread_fails_writes_instead_of_hanging(db: Database) -> None:
    def kill_the_thread(conn: object) -> None:
        raise SystemExit("simulated crash of the writer thread")

    with pytest.raises(DatabaseClosed):
        await db.write(kill_the_thread)
    assert db.writer_healthy is False
    with pytest.raises(DatabaseClosed):
        await db.write(lambda conn: None)


async def test_one_failing_job_does_not_fail_the_others_in_its_transaction(
    db: Database,
) -> None:
    import asyncio

    def fails(conn: sa.Connection) -> None:
        conn.execute(sa.text("SELECT * FROM no_such_table"))

    def works(conn: sa.Connection) -> int:
        return conn.execute(sa.text("SELECT 41 + 1")).scalar_one()

    results = await asyncio.gather(
        db.write(works), db.write(fails), db.write(works), return_exceptions=True
    )
    assert results[0] == results[2] == 42
    assert isinstance(results[1], sa.exc.ProgrammingError | sa.exc.OperationalError)


def _hold_write_lock(db_url: str) -> sqlite3.Connection:
    """Another process's writer, in the middle of a transaction."""
    other = sqlite3.connect(
        make_url(db_url).database, isolation_level=None, check_same_thread=False
    )
    other.execute("BEGIN IMMEDIATE")
    return other


def _commit_after_three_pauses(
    other: sqlite3.Connection, monkeypatch: pytest.MonkeyPatch
) -> list[float]:
    """The writer's pauses while it finds the lock taken; at the third, the
    other transaction ends."""
    pauses: list[float] = []

    def pause(seconds: float) -> None:
        pauses.append(seconds)
        if len(pauses) == 3:
            other.execute("COMMIT")

    monkeypatch.setattr("service.store.sqlite.busy.time.sleep", pause)  # while_busy
    return pauses


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_a_write_waits_for_another_process_holding_the_lock(
    db: Database, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = _hold_write_lock(db_url)
    pauses = _commit_after_three_pauses(other, monkeypatch)
    result = await db.write(lambda conn: conn.execute(sa.text("SELECT 41 + 1")).scalar_one())
    assert result == 42
    # Short pauses, doubling: not SQLite's own 1, 2, 5 ms and up.
    assert pauses == [0.0001, 0.0002, 0.0004]
    other.close()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_a_write_fails_once_the_lock_is_held_past_busy_timeout(
    db: Database, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = _hold_write_lock(db_url)
    monkeypatch.setattr("service.store.sqlite.connection.SQLITE_BUSY_TIMEOUT_MS", 0)
    with pytest.raises(sa.exc.OperationalError, match="database is locked"):
        await db.write(lambda conn: conn.execute(sa.text("SELECT 1")))
    other.execute("COMMIT")
    other.close()
    # Nothing stuck: the next write goes through.
    assert await db.write(lambda conn: conn.execute(sa.text("SELECT 2")).scalar_one()) == 2


class Numbers:
    """Rows for the driver-level INSERT (writer.Rows): numbers into a table whose
    CHECK refuses negative ones."""

    sql = "INSERT INTO numbers (x, tag) SELECT json_extract(value, '$[0]'), ?2 FROM json_each(?1)"
    setup = ("CREATE TABLE IF NOT EXISTS numbers (x INTEGER NOT NULL CHECK (x >= 0), tag TEXT)",)

    def __init__(self, *numbers: int, tag: str = "a") -> None:
        self.numbers = numbers
        self.params = (tag,)
        self.check = None
        self.taken = 0

    def take(self) -> list[str]:
        self.taken += 1
        return [f"[{n}]" for n in self.numbers]

    def written(self) -> tuple[int, ...]:
        return self.numbers

    def committed(self, raw: sqlite3.Connection) -> bool:
        # Tests' numbers are distinct: the first one tells.
        return (
            raw.execute("SELECT 1 FROM numbers WHERE x = ?", self.numbers[:1]).fetchone()
            is not None
        )


def _queue_rows(db: Database, rows: Numbers) -> asyncio.Future[object]:
    """db.submit_rows: the rows are queued for the writer (or sent to the rows
    process) when this returns; the future has their outcome."""
    future, done = _outcome()
    db.submit_rows(rows, done)
    return future


def _queue_job(db: Database, job: Callable[[sa.Connection], object]) -> asyncio.Future[object]:
    """db.submit: the job is queued for the writer when this returns."""
    future, done = _outcome()
    db.submit(job, done)
    return future


def _queued_for_writer(db: Database, monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """What is queued for the SQLite writer thread from now on, once queued
    (write_statement queues in a task: nothing else tells when it has)."""
    writer = db._writer
    assert writer is not None
    queued: list[object] = []
    queue = writer._queue

    def record(item: Any) -> None:
        queue(item)
        queued.append(item)

    monkeypatch.setattr(writer, "_queue", record)
    return queued


def _outcome() -> tuple[asyncio.Future[object], Callable[[object, BaseException | None], None]]:
    future: asyncio.Future[object] = asyncio.get_running_loop().create_future()

    def done(result: object, error: BaseException | None) -> None:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    return future, done


async def _submit_rows(db: Database, rows: Numbers) -> object:
    return await _queue_rows(db, rows)


async def _numbers(db: Database) -> list[int]:
    async with db.engine.connect() as conn:
        return list(await conn.scalars(sa.text("SELECT x FROM numbers ORDER BY x")))


async def _hold_writer(db: Database) -> tuple[object, object]:
    """A job that keeps the writer thread busy until released; what is queued
    meanwhile goes in the next transaction together."""
    import asyncio
    import threading

    entered = asyncio.Event()
    release = threading.Event()
    loop = asyncio.get_running_loop()

    def hold(conn: sa.Connection) -> None:
        loop.call_soon_threadsafe(entered.set)
        release.wait(30)

    task = asyncio.create_task(db.write(hold))
    await entered.wait()
    return task, release


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_rows_queued_together_are_one_transaction(db: Database) -> None:
    held, release = await _hold_writer(db)
    before = db._writer.transactions  # type: ignore[union-attr]
    writes = [Numbers(1, 2), Numbers(3), Numbers(4, 5, 6)]
    results = [_queue_rows(db, rows) for rows in writes]
    release.set()  # type: ignore[attr-defined]
    await held  # type: ignore[misc]
    assert await asyncio.gather(*results) == [(1, 2), (3,), (4, 5, 6)]
    assert db._writer.transactions == before + 2  # type: ignore[union-attr]
    assert await _numbers(db) == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_rows_with_other_parameters_are_not_merged(db: Database) -> None:
    held, release = await _hold_writer(db)
    before = db._writer.transactions  # type: ignore[union-attr]
    writes = [Numbers(1, tag="a"), Numbers(2, tag="b"), Numbers(3, 4, tag="a")]
    results = [_queue_rows(db, rows) for rows in writes]
    release.set()  # type: ignore[attr-defined]
    await held  # type: ignore[misc]
    assert await asyncio.gather(*results) == [(1,), (2,), (3, 4)]
    # The held job, then one INSERT for tag a's rows and one for tag b's.
    assert db._writer.transactions == before + 3  # type: ignore[union-attr]
    async with db.engine.connect() as conn:
        rows = (await conn.execute(sa.text("SELECT x, tag FROM numbers ORDER BY x"))).all()
    assert [tuple(row) for row in rows] == [(1, "a"), (2, "b"), (3, "a"), (4, "a")]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_a_bad_row_fails_only_its_own_write_among_merged_rows(db: Database) -> None:
    held, release = await _hold_writer(db)
    before = db._writer.transactions  # type: ignore[union-attr]
    writes = [Numbers(1, 2), Numbers(3, -1), Numbers(4)]
    results = [_queue_rows(db, rows) for rows in writes]
    release.set()  # type: ignore[attr-defined]
    await held  # type: ignore[misc]
    outcomes = await asyncio.gather(*results, return_exceptions=True)
    assert outcomes[0] == (1, 2) and outcomes[2] == (4,)
    assert isinstance(outcomes[1], sqlite3.IntegrityError)
    assert "CHECK constraint failed" in str(outcomes[1])
    assert await _numbers(db) == [1, 2, 4]
    # Each write's rows taken for the merged INSERT (on its own, then in a
    # transaction), then again to run alone in that transaction, the one
    # after the held job's (1 + 3 had each write gone alone).
    assert [rows.taken for rows in writes] == [3, 3, 3]
    assert db._writer.transactions == before + 2  # type: ignore[union-attr]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_rows_wait_for_another_process_holding_the_lock(
    db: Database, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _submit_rows(db, Numbers(0))  # the table exists before the lock is taken
    other = _hold_write_lock(db_url)
    pauses = _commit_after_three_pauses(other, monkeypatch)
    assert await _submit_rows(db, Numbers(7)) == (7,)
    assert pauses == [0.0001, 0.0002, 0.0004]
    other.close()
    assert await _numbers(db) == [0, 7]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_rows_fail_once_the_lock_is_held_past_busy_timeout(
    db: Database, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _submit_rows(db, Numbers(0))
    other = _hold_write_lock(db_url)
    monkeypatch.setattr("service.store.sqlite.connection.SQLITE_BUSY_TIMEOUT_MS", 0)
    with pytest.raises(sqlite3.OperationalError, match="database is locked"):
        await _submit_rows(db, Numbers(1))
    other.execute("COMMIT")
    other.close()
    assert await _submit_rows(db, Numbers(2)) == (2,)
    assert await _numbers(db) == [0, 2]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_write_statement_gives_its_row_count_and_its_error(db: Database) -> None:
    await _submit_rows(db, Numbers(1, 2, 3))
    assert await db.write_statement("UPDATE numbers SET x = x + 10 WHERE x >= ?", (2,)) == 2
    with pytest.raises(sqlite3.IntegrityError, match="CHECK constraint failed"):
        await db.write_statement("UPDATE numbers SET x = -x WHERE x = ?", (1,))
    assert await _numbers(db) == [1, 12, 13]


def test_the_backend_is_chosen_once_from_the_url(tmp_path: Path) -> None:
    from service.store.postgres.database import PostgresDatabase
    from service.store.sqlite.database import SQLiteDatabase

    sqlite_db = open_database(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    postgres_db = open_database("postgresql+asyncpg://nobody@127.0.0.1:9/none")
    assert (type(sqlite_db), type(postgres_db)) == (SQLiteDatabase, PostgresDatabase)
    with pytest.raises(ValueError, match="DATABASE_URL must be"):
        open_database("mysql://nobody@127.0.0.1/none")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_a_rows_setup_outlives_a_transaction_that_failed(db: Database) -> None:
    def ends_the_transaction(conn: sa.Connection) -> None:
        conn.connection.driver_connection.execute("ROLLBACK")  # as a disk error would

    held, release = await _hold_writer(db)
    # The first rows share a transaction with the failing job: their setup
    # must not be undone with it.
    failing = _queue_job(db, ends_the_transaction)
    rows = _queue_rows(db, Numbers(1))
    release.set()  # type: ignore[attr-defined]
    await held  # type: ignore[misc]
    outcomes = await asyncio.gather(failing, rows, return_exceptions=True)
    assert all(isinstance(o, sqlite3.OperationalError) for o in outcomes), outcomes
    assert await _submit_rows(db, Numbers(2)) == (2,)
    assert await _numbers(db) == [2]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_nothing_is_answered_inside_a_transaction_left_open(db: Database) -> None:
    await _submit_rows(db, Numbers(0))
    # The writer's connection left inside a transaction (as by a COMMIT and a
    # ROLLBACK that both failed): the next write must not run inside it.
    await db.write_statement("BEGIN", ())
    assert await _submit_rows(db, Numbers(5)) == (5,)
    assert await _numbers(db) == [0, 5]  # committed: another connection sees it


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_driver_writes_queued_together_commit_one_statement_each(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _submit_rows(db, Numbers(0))
    held, release = await _hold_writer(db)
    before = db._writer.transactions  # type: ignore[union-attr]
    queued = _queued_for_writer(db, monkeypatch)
    rows = [_queue_rows(db, Numbers(n)) for n in (1, 2)]
    bad = asyncio.create_task(db.write_statement("UPDATE numbers SET x = -1 WHERE x = 0", ()))
    good = asyncio.create_task(db.write_statement("UPDATE numbers SET x = 10 WHERE x = 0", ()))
    await until(lambda: len(queued) == 4)  # all behind the held job: one batch
    release.set()  # type: ignore[attr-defined]
    await held  # type: ignore[misc]
    assert await asyncio.gather(*rows) == [(1,), (2,)]
    with pytest.raises(sqlite3.IntegrityError, match="CHECK constraint failed"):
        await bad
    assert await good == 1
    # The held job's, the two inserts' (merged) and each statement's: a
    # failing statement fails alone.
    assert db._writer.transactions == before + 4  # type: ignore[union-attr]
    assert await _numbers(db) == [1, 2, 10]


async def test_the_writer_thread_starts_the_wal_again_past_its_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no checkpointer at all, the writer thread alone starts the WAL
    again between its commits."""
    from service.store.sqlite.writer import SQLiteWriter

    limit = 64 * 1024
    monkeypatch.setattr(SQLiteWriter, "_checkpoint", lambda self: None)
    path = tmp_path / "wal.db"
    async with blobs(path, monkeypatch, limit=limit, checkpoint_seconds=0.0) as db:
        largest = 0
        for _ in range(400):
            await db.write(
                lambda conn: conn.execute(sa.text("INSERT INTO blobs VALUES (randomblob(16384))"))
            )
            largest = max(largest, wal_size(path))
    # 6.4 MB went through the WAL; it never held more than the limit and the
    # commit that went past it.
    assert largest < 2 * limit


@contextlib.asynccontextmanager
async def blobs(
    path: Path, monkeypatch: pytest.MonkeyPatch, *, limit: int, checkpoint_seconds: float
) -> AsyncIterator[Database]:
    """A database file with a table of blobs, its WAL bound to ``limit`` bytes."""
    from service.store.sqlite import connection as db_module

    monkeypatch.setattr(db_module, "WAL_LIMIT_BYTES", limit)
    monkeypatch.setattr(db_module, "CHECKPOINT_SECONDS", checkpoint_seconds)
    db = open_database(f"sqlite+aiosqlite:///{path}")
    await db.start()
    try:
        await db.write(lambda conn: conn.execute(sa.text("CREATE TABLE blobs (b BLOB)")))
        yield db
    finally:
        await db.close()
        await db.engine.dispose()


def wal_size(path: Path) -> int:
    return path.with_name(f"{path.name}-wal").stat().st_size


def test_a_wal_restart_a_reader_holds_up_is_not_tried_again_until_its_interval(
    tmp_path: Path,
) -> None:
    from service.store.sqlite.wal_restart import WalRestarts

    class Recording(sqlite3.Connection):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.restarts = 0

        def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:  # type: ignore[override]
            self.restarts += sql == "PRAGMA wal_checkpoint(RESTART)"
            return super().execute(sql, *args)

    path = tmp_path / "wal.db"
    writer = sqlite3.connect(path, isolation_level=None, factory=Recording)
    reader = sqlite3.connect(path, isolation_level=None)
    try:
        writer.execute("PRAGMA journal_mode=WAL")
        writer.execute("PRAGMA busy_timeout=0")
        writer.execute("PRAGMA wal_autocheckpoint=0")
        writer.execute("PRAGMA journal_size_limit=8192")
        writer.execute("CREATE TABLE blobs (b BLOB)")
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM blobs").fetchone()  # a snapshot in the WAL
        restarts = WalRestarts(str(path), limit=8192, interval=3600)

        def write() -> int:
            writer.execute("INSERT INTO blobs VALUES (randomblob(16384))")
            restarts.after_commit(writer)
            return wal_size(path)

        sizes = [write() for _ in range(5)]
        assert writer.restarts == 1  # refused by the reader, not tried after every commit
        assert sizes == sorted(sizes) and sizes[-1] > 5 * 16384  # the WAL was not started again
        reader.execute("COMMIT")
        fresh = WalRestarts(str(path), limit=8192, interval=3600)
        fresh.after_commit(writer)
        assert writer.restarts == 2
        assert write() < sizes[-1]  # started again, and trimmed
    finally:
        writer.close()
        reader.close()


async def test_the_wal_stays_bounded_under_steady_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under load a write always follows the last closely, so the WAL was never
    started again from its beginning: it grew for as long as the load lasted."""
    import asyncio
    import os

    limit = 256 * 1024
    path = tmp_path / "wal.db"
    async with blobs(path, monkeypatch, limit=limit, checkpoint_seconds=0.005) as db:
        largest = 0

        def insert(conn: sa.Connection) -> int:
            conn.execute(sa.text("INSERT INTO blobs VALUES (randomblob(16384))"))
            return os.path.getsize(f"{path}-wal")

        async def writer(rounds: int) -> None:
            nonlocal largest
            for _ in range(rounds):
                largest = max(largest, await db.write(insert))

        # Eight writers keep the writer thread busy: 32 MB through the WAL.
        await asyncio.gather(*(writer(250) for _ in range(8)))
        count = await db.write(
            lambda conn: conn.execute(sa.text("SELECT count(*) FROM blobs")).scalar()
        )
    assert count == 2000
    # Without the RESTART the WAL grew to 36 MB (all that went through it);
    # with it, 2 to 4.5 MB in most runs (what a few checkpoint intervals
    # write), 11.7 MB at worst seen, when the checkpointer thread waited long
    # for the GIL and a gap between transactions: the bound is half the 32 MB.
    assert largest < 16 * 1024 * 1024


def test_sqlite_time_is_utc_text_as_sqlalchemy_stores_it() -> None:
    from datetime import UTC, datetime, timedelta, timezone

    assert sqlite_time(datetime(2026, 1, 2, 3, 4, 5, 7, tzinfo=UTC)) == "2026-01-02 03:04:05.000007"
    plus_two = datetime(2026, 1, 2, 1, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    assert sqlite_time(plus_two) == "2026-01-01 23:04:05.000000"
    stored = sa.create_engine("sqlite://")
    with stored.begin() as conn:
        when = datetime(2026, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
        text = conn.execute(sa.select(sa.cast(sa.literal(when, sa.DateTime), sa.String))).scalar()
    assert sqlite_time(when) == text


# -- what counts as "the database is unavailable" ----------------------------------


def _through_sqlalchemy(error: Exception) -> Exception:
    """``error`` as SQLAlchemy's asyncpg dialect hands it to the service."""
    import asyncpg
    from sqlalchemy import exc as sa_exc
    from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_dbapi

    dbapi = AsyncAdapt_asyncpg_dbapi(asyncpg)
    for cls in type(error).__mro__:
        if cls in dbapi._asyncpg_error_translate:
            try:
                raise dbapi._asyncpg_error_translate[cls](str(error), error) from error
            except Exception as adapted:
                return sa_exc.DBAPIError.instance("SELECT 1", None, adapted, dbapi.Error)
    return error


def _asyncpg_errors() -> dict[str, Exception]:
    import asyncpg.exceptions as pg

    return {
        "starting up": pg.CannotConnectNowError("the database system is starting up"),
        "admin shutdown": pg.AdminShutdownError("terminating connection"),
        "crash shutdown": pg.CrashShutdownError("terminating connection"),
        "too many connections": pg.TooManyConnectionsError("sorry, too many clients"),
        "connection failure": pg.ConnectionFailureError("connection failure"),
        "connection lost": pg.ConnectionDoesNotExistError("connection was closed"),
        "unique violation": pg.UniqueViolationError("duplicate key"),
        "syntax error": pg.PostgresSyntaxError("syntax error"),
    }


@pytest.mark.parametrize(
    ("name", "unavailable"),
    [
        ("starting up", True),
        ("admin shutdown", True),
        ("crash shutdown", True),
        ("too many connections", True),
        ("connection failure", True),
        ("connection lost", True),
        ("unique violation", False),
        ("syntax error", False),
    ],
)
@pytest.mark.parametrize("wrapped", [False, True])
def test_what_says_the_database_is_unavailable(name: str, unavailable: bool, wrapped: bool) -> None:
    from service.store.errors import is_unavailable

    error = _asyncpg_errors()[name]
    assert is_unavailable(_through_sqlalchemy(error) if wrapped else error) is unavailable


def test_refused_connections_and_an_empty_pool_are_unavailable() -> None:
    from sqlalchemy import exc as sa_exc

    from service.store.errors import is_unavailable

    assert is_unavailable(ConnectionRefusedError(111, "Connect call failed"))
    assert is_unavailable(OSError("Multiple exceptions: [Errno 111] Connect call failed"))
    assert is_unavailable(sa_exc.TimeoutError("QueuePool limit reached"))
    assert not is_unavailable(ValueError("a bug"))
