"""The SQLite rows process (service/store/sqlite/rows_process.py): the intake's hot path."""

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

from service.store import open_database
from service.store.database import Database
from service.store.sqlite import connection as rules
from service.store.sqlite.rows_process import RowsProcess
from service.store.sqlite.writer import SQLiteWriter

from .support.service import poll_until
from .test_db import Numbers, _queue_rows, _submit_rows, wal_size


@pytest_asyncio.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = open_database(f"sqlite+aiosqlite:///{tmp_path / 'rows.db'}", rows_process=True)
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


async def _stopped(pid: int) -> None:
    """SIGSTOP, and wait until the process is stopped: until then it may still
    read what it is sent, one write at a time."""
    os.kill(pid, signal.SIGSTOP)

    async def stopped() -> bool:
        return _state(pid) == "T"

    await poll_until(stopped, wait_seconds=10, interval=0.001)


def _state(pid: int) -> str:
    """The process's state letter (proc(5)): R running, S sleeping, T stopped..."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


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


async def test_a_bad_row_fails_only_its_own_write_among_merged_ones(db: Database) -> None:
    rows = _child(db)
    assert await _submit_rows(db, Numbers(0)) == (0,)  # its table set up
    # Stopped while they are sent, it reads them at once and merges those of
    # one INSERT with the same parameters: the bad row fails that statement,
    # and each write runs again alone.
    await _stopped(_pid(rows))
    writes = [Numbers(1, 2), Numbers(3, -1), Numbers(4, tag="b"), Numbers(5)]
    sent = [_queue_rows(db, w) for w in writes]  # in its pipe when this returns
    os.kill(_pid(rows), signal.SIGCONT)
    outcomes = await asyncio.gather(*sent, return_exceptions=True)
    assert outcomes[0] == (1, 2) and outcomes[2] == (4,) and outcomes[3] == (5,)
    assert isinstance(outcomes[1], sqlite3.IntegrityError)
    assert "CHECK constraint failed" in str(outcomes[1])
    assert await _numbers(db) == [(0, "a"), (1, "a"), (2, "a"), (4, "b"), (5, "a")]
    # The order the rows were written in: the tag a writes as one group (their
    # merged INSERT, which failed, then each alone), before the tag b write
    # sent ahead of the last of them. Written one by one as they came, 5
    # would follow 4. (The failed INSERT itself leaves no trace to look at.)
    async with db.engine.connect() as conn:
        in_order = await conn.scalars(sa.text("SELECT x FROM numbers ORDER BY rowid"))
        assert list(in_order) == [0, 1, 2, 5, 4]


async def test_rows_with_a_test_hook_go_to_the_writer_thread(db: Database) -> None:
    before = db._writer.transactions  # type: ignore[union-attr]
    hooked = Numbers(7)
    hooked.check = lambda: None  # type: ignore[assignment]
    assert await _submit_rows(db, hooked) == (7,)
    assert db._writer.transactions == before + 1  # type: ignore[union-attr]


async def test_it_ignores_the_signals_meant_for_the_service(db: Database) -> None:
    rows = _child(db)
    # Set before it said it was ready: the write below cannot be answered
    # before the signals arrive and pass for a process that ignores them.
    ignored = _ignored_signals(_pid(rows))
    assert ignored & (1 << (signal.SIGTERM - 1)) and ignored & (1 << (signal.SIGINT - 1))
    os.kill(_pid(rows), signal.SIGTERM)
    os.kill(_pid(rows), signal.SIGINT)
    assert await _submit_rows(db, Numbers(1)) == (1,)
    assert rows.running


async def test_a_write_it_had_not_committed_when_it_died_is_written_by_the_thread(
    db: Database,
) -> None:
    rows = _child(db)
    assert await _submit_rows(db, Numbers(1)) == (1,)
    pid = _pid(rows)
    os.kill(pid, signal.SIGSTOP)  # it cannot read what it is sent
    stranded = _queue_rows(db, Numbers(2))  # in its pipe when this returns
    before = db._writer.transactions  # type: ignore[union-attr]
    os.kill(pid, signal.SIGKILL)
    assert await stranded == (2,)  # not an error: its rows were written after all
    assert not rows.running
    assert await _submit_rows(db, Numbers(3)) == (3,)
    # The stranded write and the next, both on the thread.
    assert db._writer.transactions == before + 2  # type: ignore[union-attr]
    assert await _numbers(db) == [(1, "a"), (2, "a"), (3, "a")]


async def test_a_write_it_committed_before_it_died_is_answered_once_written(
    db: Database, tmp_path: Path
) -> None:
    rows = _child(db)
    assert await _submit_rows(db, Numbers(0)) == (0,)  # its table set up
    pid = _pid(rows)
    await _stopped(pid)
    stranded = _queue_rows(db, Numbers(1, 2))  # in its pipe when this returns
    # What the process would have left had it committed the write and died
    # before its answer: the rows in the database, no answer.
    with sqlite3.connect(tmp_path / "rows.db", isolation_level=None) as other:
        other.execute("INSERT INTO numbers (x, tag) VALUES (1, 'a'), (2, 'a')")
    os.kill(pid, signal.SIGKILL)
    # The thread finds the rows and answers ok without writing them again.
    assert await stranded == (1, 2)
    assert not rows.running
    assert await _numbers(db) == [(0, "a"), (1, "a"), (2, "a")]


async def test_close_answers_what_was_sent_before_it_ends(tmp_path: Path) -> None:
    database = open_database(f"sqlite+aiosqlite:///{tmp_path / 'rows.db'}", rows_process=True)
    await database.start()
    try:
        pid = _pid(_child(database))
        # In its pipe, none answered yet (the loop has not come round).
        sent = [_queue_rows(database, Numbers(n)) for n in range(50)]
        await database.close()
        assert [s.result() for s in sent] == [(n,) for n in range(50)]
        assert not _exists(pid)  # ended, and reaped
        with sqlite3.connect(tmp_path / "rows.db") as conn:
            assert conn.execute("SELECT count(*) FROM numbers").fetchone() == (50,)
    finally:
        await database.engine.dispose()


async def test_a_process_that_cannot_open_the_database_fails_its_start(tmp_path: Path) -> None:
    rows = RowsProcess(
        str(tmp_path / "no such directory" / "x.db"),
        busy_timeout_ms=100,
        journal_size_limit=0,
        checkpoint_seconds=0.1,
    )
    with pytest.raises(RuntimeError, match="failed to start"):
        await rows.start()
    assert not rows.running


async def test_an_in_memory_database_has_no_process() -> None:
    async with open_database("sqlite+aiosqlite:///:memory:", rows_process=True) as database:
        assert database._rows is None


def _ignored_signals(pid: int) -> int:
    """The process's mask of ignored signals (bit n-1 for signal n)."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return next(int(line.split()[1], 16) for line in status if line.startswith("SigIgn:"))


def _exists(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _rows_children(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [
        int(c)
        for c in children
        if b"service.store.sqlite.rows_child" in Path(f"/proc/{c}/cmdline").read_bytes()
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


async def test_the_intakes_requests_survive_the_process_dying_under_them(tmp_path: Path) -> None:
    """The real rows (a TEMP view's trigger writes documents and outbox rows),
    stranded in a stopped process that is then killed: the thread writes them
    (setting the view up on its own connection) and each request is accepted."""
    from service import auth, migrate
    from service.intake import Accepted, DocumentIntake

    from .test_intake import counts, submission

    database = open_database(f"sqlite+aiosqlite:///{tmp_path / 'rows.db'}", rows_process=True)
    await migrate.upgrade(database.engine)
    await database.start()
    intake = DocumentIntake(database)
    await intake.start()
    try:
        user = await auth.create_user(database, "alice", "a long password")
        warm = submission(user, "first")
        assert await intake.submit(warm) == Accepted(warm.event.id)
        child = _child(database)
        pid = _pid(child)
        os.kill(pid, signal.SIGSTOP)
        handed = asyncio.Event()
        submit = child.submit

        def handing(rows: object, done: object) -> None:
            submit(rows, done)  # type: ignore[arg-type]
            handed.set()

        child.submit = handing  # type: ignore[method-assign]
        subs = [submission(user, f"d{i}") for i in range(3)]
        stranded = [asyncio.ensure_future(intake.submit(s)) for s in subs]
        await handed.wait()  # the intake's batch is in the stopped process's pipe
        os.kill(pid, signal.SIGKILL)
        assert await asyncio.gather(*stranded) == [Accepted(s.event.id) for s in subs]
        later = submission(user, "later")
        assert await intake.submit(later) == Accepted(later.event.id)
        assert await counts(database.engine) == (5, 5)
    finally:
        await intake.close()
        await database.close()
        await database.engine.dispose()


class Doubled(Numbers):
    """Rows into a TEMP table that their setup makes, after a trigger on a
    table that may not be there yet."""

    sql = "INSERT INTO doubled SELECT json_extract(value, '$[0]') * 2 + 0 * ?2 FROM json_each(?1)"
    setup = (
        "CREATE TEMP TRIGGER IF NOT EXISTS on_base AFTER INSERT ON base BEGIN SELECT 1; END",
        "CREATE TEMP TABLE IF NOT EXISTS doubled (x INTEGER)",
    )


async def test_a_setup_that_failed_is_tried_again_with_the_next_write(db: Database) -> None:
    _child(db)
    with pytest.raises(sqlite3.OperationalError, match="no such table: (main.)?base"):
        await _submit_rows(db, Doubled(1))
    await db.write(lambda conn: conn.execute(sa.text("CREATE TABLE base (x INTEGER)")))
    # Its setup again, whole this time: the TEMP table is there for the INSERT.
    assert await _submit_rows(db, Doubled(2)) == (2,)


@pytest_asyncio.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Database, object, object]]:
    """The intake on the path production takes: a migrated file, the rows
    process, no fault point set."""
    from service import auth, migrate
    from service.intake import DocumentIntake

    database = open_database(f"sqlite+aiosqlite:///{tmp_path / 'rows.db'}", rows_process=True)
    await migrate.upgrade(database.engine)
    await database.start()
    intake = DocumentIntake(database)
    await intake.start()
    try:
        user = await auth.create_user(database, "alice", "a long password")
        yield database, intake, user
    finally:
        await intake.close()
        await database.close()
        await database.engine.dispose()


async def test_on_the_fast_path_a_document_is_never_kept_without_its_event(
    served: tuple[Database, object, object],
) -> None:
    """One submission's event id is taken already: the trigger's outbox INSERT
    fails after its document was inserted by the same statement. Nothing of it
    is kept, and the requests merged into the same statement are written."""
    from service import outbox
    from service.intake import Accepted, DocumentIntake, StorageUnavailable

    from .test_intake import counts, submission

    db, intake, user = served
    assert isinstance(intake, DocumentIntake)
    taken = submission(user, "taken")
    await outbox.enqueue(db, [taken.event])
    writer = db._writer  # type: ignore[attr-defined]
    before = writer.transactions
    subs = [submission(user, "a"), submission(user, "dup"), submission(user, "b")]
    subs[1].event = taken.event  # the same event id as the row already there
    results = await asyncio.gather(*(intake.submit(s) for s in subs), return_exceptions=True)
    assert results[0] == Accepted(subs[0].event.id) and results[2] == Accepted(subs[2].event.id)
    assert isinstance(results[1], StorageUnavailable)
    assert writer.transactions == before  # the rows process wrote them, not the thread
    async with db.engine.connect() as conn:
        names = set((await conn.scalars(sa.text("SELECT document_name FROM documents"))).all())
    assert names == {"a", "b"}
    assert await counts(db.engine) == (2, 3)  # the taken id's row, and a's and b's


async def test_on_the_fast_path_an_answer_waits_for_its_commit(
    served: tuple[Database, object, object], tmp_path: Path
) -> None:
    """Another connection holds SQLite's write lock: the rows process waits for
    it, and the request has no answer until its own statement has committed."""
    from service.intake import Accepted, DocumentIntake

    from .test_intake import counts, submission

    db, intake, user = served
    assert isinstance(intake, DocumentIntake)
    blocker = sqlite3.connect(tmp_path / "rows.db", isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        sub = submission(user, "held")
        request = asyncio.ensure_future(intake.submit(sub))
        # Not a wait for something: time in which an answer given before the
        # commit would arrive (the rows process polls the lock meanwhile).
        await asyncio.sleep(0.2)
        assert not request.done()
        assert await counts(db.engine) == (0, 0)
        blocker.execute("COMMIT")
        assert await request == Accepted(sub.event.id)
        assert await counts(db.engine) == (1, 1)
    finally:
        blocker.close()


async def test_a_small_relay_batch_goes_to_the_process_and_a_large_one_to_the_thread(
    served: tuple[Database, object, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    from datetime import UTC, datetime

    import orjson

    from service import relay, relay_keys
    from service.intake import DocumentIntake, Relayed, RelayRequest
    from service.store.sqlite import database as sqlite_database

    db, intake, _ = served
    assert isinstance(intake, DocumentIntake)
    await relay_keys.add_key(db, "app", now=datetime(2026, 1, 1, tzinfo=UTC))
    monkeypatch.setattr(sqlite_database, "RELAY_ROWS_PROCESS_EVENTS", 3)

    def request(count: int) -> RelayRequest:
        at = datetime.now(UTC)
        body = orjson.dumps([{"name": f"a/{i}"} for i in range(count)])
        events = relay.read_events(
            body, origin="app", seed=None, received_at=at, max_event_bytes=1 << 20
        )
        return RelayRequest("app", events, at)

    writer = db._writer  # type: ignore[attr-defined]
    before = writer.transactions
    small = request(3)
    assert await intake.relay(small) == Relayed(3)
    assert writer.transactions == before  # written by the rows process
    large = request(4)
    assert await intake.relay(large) == Relayed(4)
    assert writer.transactions == before + 1  # written by the thread
    async with db.engine.connect() as conn:
        stored = set(await conn.scalars(sa.text("SELECT id FROM outbox WHERE origin = 'app'")))
    assert stored == {e.id for e in [*small.events, *large.events]}


async def test_the_process_starts_the_wal_again_past_its_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its writes keep SQLite's write lock nearly all the time: a RESTART from
    the checkpointer would seldom find it free. Here there is no checkpointer
    at all: only the process can start the WAL again."""
    limit = 16 * 1024
    monkeypatch.setattr(rules, "WAL_LIMIT_BYTES", limit)
    monkeypatch.setattr(rules, "CHECKPOINT_SECONDS", 0.0)
    monkeypatch.setattr(SQLiteWriter, "_checkpoint", lambda self: None)
    path = tmp_path / "rows.db"
    database = open_database(f"sqlite+aiosqlite:///{path}", rows_process=True)
    await database.start()
    try:
        _child(database)
        largest = 0
        for n in range(0, 40_000, 200):
            await _submit_rows(database, Numbers(*range(n, n + 200)))
            largest = max(largest, wal_size(path))
        assert database._writer.transactions == 0  # type: ignore[union-attr]
    finally:
        await database.close()
        await database.engine.dispose()
    assert len(_numbers_of(path)) == 40_000
    # 200 transactions, each a few pages: without a RESTART the WAL grew to all
    # of them (about 2 MB); with one after each commit past the limit, it is
    # the limit and the transaction that went past it.
    assert largest < 4 * limit


def _numbers_of(path: Path) -> list[int]:
    with sqlite3.connect(path) as conn:
        return [x for (x,) in conn.execute("SELECT x FROM numbers")]
