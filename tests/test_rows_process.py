"""The SQLite rows process (service.rows_process): the intake's hot path."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import sqlalchemy as sa

from service.db import Database
from service.rows_process import RowsProcess

from .test_db import Numbers, _submit_rows


@pytest_asyncio.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'rows.db'}", rows_process=True)
    await database.start()
    try:
        yield database
    finally:
        await database.close()
        await database.engine.dispose()


def _child(db: Database) -> RowsProcess:
    rows = db._rows
    assert rows is not None and rows.running
    return rows


def _pid(rows: RowsProcess) -> int:
    assert rows._transport is not None
    pid = rows._transport.get_pid()
    assert pid is not None
    return pid


async def _numbers(db: Database) -> list[tuple[int, str]]:
    async with db.engine.connect() as conn:
        result = await conn.execute(sa.text("SELECT x, tag FROM numbers ORDER BY x"))
        return [tuple(row) for row in result]  # type: ignore[misc]


async def test_rows_are_written_by_the_process_not_the_writer_thread(db: Database) -> None:
    _child(db)
    before = db._writer.transactions  # type: ignore[union-attr]
    results = await asyncio.gather(*(_submit_rows(db, Numbers(n, n + 100)) for n in range(5)))
    assert results == [(n, n + 100) for n in range(5)]
    assert db._writer.transactions == before  # type: ignore[union-attr]
    assert [x for x, _ in await _numbers(db)] == sorted([*range(5), *range(100, 105)])


async def test_a_bad_row_fails_only_its_own_write(db: Database) -> None:
    # Sent in one turn of the loop: the process reads them at once (and merges
    # them) or one by one; either way each write has its own outcome.
    writes = [Numbers(1, 2), Numbers(3, -1), Numbers(4, tag="b"), Numbers(5)]
    outcomes = await asyncio.gather(*(_submit_rows(db, w) for w in writes), return_exceptions=True)
    assert outcomes[0] == (1, 2) and outcomes[2] == (4,) and outcomes[3] == (5,)
    assert isinstance(outcomes[1], sqlite3.IntegrityError)
    assert "CHECK constraint failed" in str(outcomes[1])
    assert await _numbers(db) == [(1, "a"), (2, "a"), (4, "b"), (5, "a")]


async def test_rows_with_a_test_hook_go_to_the_writer_thread(db: Database) -> None:
    before = db._writer.transactions  # type: ignore[union-attr]
    hooked = Numbers(7)
    hooked.check = lambda: None  # type: ignore[assignment]
    assert await _submit_rows(db, hooked) == (7,)
    assert db._writer.transactions == before + 1  # type: ignore[union-attr]


async def test_it_ignores_the_signals_meant_for_the_service(db: Database) -> None:
    rows = _child(db)
    os.kill(_pid(rows), signal.SIGTERM)
    os.kill(_pid(rows), signal.SIGINT)
    assert await _submit_rows(db, Numbers(1)) == (1,)
    assert rows.running


async def test_a_write_in_its_hands_when_it_dies_fails_and_the_thread_takes_over(
    db: Database,
) -> None:
    rows = _child(db)
    assert await _submit_rows(db, Numbers(1)) == (1,)
    pid = _pid(rows)
    os.kill(pid, signal.SIGSTOP)  # it cannot read what it is sent
    stranded = asyncio.ensure_future(_submit_rows(db, Numbers(2)))
    await asyncio.sleep(0)
    assert not stranded.done()
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(sqlite3.OperationalError, match="rows process ended"):
        await stranded
    assert not rows.running
    before = db._writer.transactions  # type: ignore[union-attr]
    assert await _submit_rows(db, Numbers(3)) == (3,)
    assert db._writer.transactions == before + 1  # type: ignore[union-attr]
    assert [x for x, _ in await _numbers(db)] == [1, 3]


async def test_close_answers_what_was_sent_before_it_ends(tmp_path: Path) -> None:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'rows.db'}", rows_process=True)
    await database.start()
    try:
        pid = _pid(_child(database))
        sent = [asyncio.ensure_future(_submit_rows(database, Numbers(n))) for n in range(50)]
        await asyncio.sleep(0)  # all handed to the process, none answered yet
        assert not any(s.done() for s in sent)
        await database.close()
        assert [s.result() for s in sent] == [(n,) for n in range(50)]
        assert not _exists(pid)  # ended, and reaped
        with sqlite3.connect(tmp_path / "rows.db") as conn:
            assert conn.execute("SELECT count(*) FROM numbers").fetchone() == (50,)
    finally:
        await database.engine.dispose()


async def test_a_process_that_cannot_open_the_database_fails_its_start(tmp_path: Path) -> None:
    rows = RowsProcess(
        str(tmp_path / "no such directory" / "x.db"), busy_timeout_ms=100, journal_size_limit=0
    )
    with pytest.raises(RuntimeError, match="failed to start"):
        await rows.start()
    assert not rows.running


async def test_an_in_memory_database_has_no_process() -> None:
    async with Database("sqlite+aiosqlite:///:memory:", rows_process=True) as database:
        assert database._rows is None


def _exists(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _rows_children(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [
        int(c)
        for c in children
        if b"service.rows_writer" in Path(f"/proc/{c}/cmdline").read_bytes()
    ]


async def test_it_ends_when_the_service_is_killed(
    tmp_path: Path, service_env: dict[str, str]
) -> None:
    from .support.service import ServiceProcess

    service = await ServiceProcess(["serve"], env=service_env, cwd=tmp_path).started()
    try:
        (child,) = _rows_children(service.process.pid)
        ended_fd = os.pidfd_open(child)  # readable once it has exited
    finally:
        service.process.kill()
        service.process.wait()
    loop = asyncio.get_running_loop()
    ended = loop.create_future()
    loop.add_reader(ended_fd, ended.set_result, None)
    try:
        # Its input ends with the service: it writes what it was sent and ends.
        await asyncio.wait_for(ended, 20)
    finally:
        loop.remove_reader(ended_fd)
        os.close(ended_fd)
