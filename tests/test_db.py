"""The database's write path: what happens when it cannot write."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from service.db import Database, DatabaseClosed


async def test_a_database_that_cannot_be_opened_fails_at_start(tmp_path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'missing-dir' / 'x.db'}")
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


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_a_write_waits_for_another_process_holding_the_lock(
    db: Database, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = _hold_write_lock(db_url)
    pauses: list[float] = []

    def pause(seconds: float) -> None:
        # The writer found the lock taken and waits: the other transaction ends.
        pauses.append(seconds)
        if len(pauses) == 3:
            other.execute("COMMIT")

    monkeypatch.setattr("service.db.time.sleep", pause)
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
    monkeypatch.setattr("service.db.SQLITE_BUSY_TIMEOUT_MS", 0)
    with pytest.raises(sa.exc.OperationalError, match="database is locked"):
        await db.write(lambda conn: conn.execute(sa.text("SELECT 1")))
    other.execute("COMMIT")
    other.close()
    # Nothing stuck: the next write goes through.
    assert await db.write(lambda conn: conn.execute(sa.text("SELECT 2")).scalar_one()) == 2
