"""PostgreSQL specifics: LISTEN/NOTIFY wake-ups across processes, claims that
skip each other's locked rows, and the hot path's connections."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from service import outbox
from service.ids import new_event_id
from service.store.contract import NewEvent
from service.store.database import Database
from service.store.encoding import RawJSON
from service.store.errors import DatabaseClosed
from service.store.postgres import outbox_sql
from service.store.postgres.connections import HotConnections
from service.store.postgres.listener import Listener, asyncpg_dsn
from tests.fakes.inngest import StandIn
from tests.support.postgres import postgres_copy
from tests.support.service import ServiceProcess, http_session, log_in, query
from tests.support.wait import until

pytestmark = pytest.mark.slow
on_postgres = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)


@pytest.fixture
def pg_env(
    request: pytest.FixtureRequest, service_env: dict[str, str], inngest: StandIn
) -> dict[str, str]:
    env = {
        **service_env,
        "DATABASE_URL": postgres_copy(request, "postgres_with_user"),
        "INNGEST_BASE_URL": inngest.base_url,  # type: ignore[attr-defined]
        "INNGEST_EVENT_KEY": inngest.event_key,
        # A minute's poll: only a notification can deliver within the tests' timeouts.
        "WORKER_POLL_SECONDS": "60",
        "LOG_LEVEL": "INFO",
    }
    return env


async def test_a_commit_in_one_process_wakes_a_worker_in_another(
    tmp_path: Path, pg_env: dict[str, str], inngest: StandIn
) -> None:
    worker = ServiceProcess(["worker"], env=pg_env, cwd=tmp_path)
    await worker.logged("delivering to")
    api = await ServiceProcess(["serve", "--no-worker"], env=pg_env, cwd=tmp_path).started()
    try:
        async with http_session() as http:
            await log_in(http, api.url)
            response = await http.post(f"{api.url}/api", json={"documentName": "a.pdf"})
            event_id = (await response.json())["id"]
        async with asyncio.timeout(10):
            await inngest.received(1)
        assert inngest.accepted_ids == [event_id]
    finally:
        api.stop()
        assert worker.stop() == 0, worker.log()


@on_postgres
async def test_a_dropped_listener_connection_is_re_established(
    db: Database, engine: AsyncEngine
) -> None:
    wake = asyncio.Event()
    listener = Listener(db.url, wake)
    task = asyncio.create_task(listener.run())
    try:
        async with asyncio.timeout(10):
            await listener.connected.wait()
        wake.clear()
        async with engine.connect() as conn:
            await conn.exec_driver_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()"
            )
        async with asyncio.timeout(15):
            await wake.wait()  # given on reconnecting: notifications meanwhile are lost
        assert listener.connections == 2
        wake.clear()
        async with engine.begin() as conn:
            await conn.exec_driver_sql("NOTIFY inngest_outbox")
        async with asyncio.timeout(10):
            await wake.wait()
        assert listener.notifications >= 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_two_api_and_two_worker_processes_lose_nothing_when_a_worker_is_killed(
    tmp_path: Path, pg_env: dict[str, str], inngest: StandIn
) -> None:
    env = {
        **pg_env,
        "WORKER_LEASE_SECONDS": "2",
        "WORKER_POLL_SECONDS": "0.5",
        "WORKER_BATCH_SIZE": "20",
        "LOG_LEVEL": "WARNING",
    }
    workers = [ServiceProcess(["worker"], env=env, cwd=tmp_path) for _ in range(2)]
    apis = [
        await ServiceProcess(["serve", "--no-worker"], env=env, cwd=tmp_path).started()
        for _ in range(2)
    ]
    acknowledged: list[str] = []
    halfway = asyncio.Event()

    async def post(http, url: str, i: int) -> None:  # type: ignore[no-untyped-def]
        response = await http.post(f"{url}/api", json={"documentName": f"d{i}"})
        assert response.status == 200, await response.text()
        acknowledged.append((await response.json())["id"])
        if len(acknowledged) >= 150:
            halfway.set()

    try:
        async with http_session() as first, http_session() as second:
            await log_in(first, apis[0].url)
            await log_in(second, apis[1].url)
            posts = [
                asyncio.create_task(
                    post(*((first, apis[0].url) if i % 2 else (second, apis[1].url)), i)
                )
                for i in range(300)
            ]
            async with asyncio.timeout(60):
                await halfway.wait()
            workers[0].kill()  # mid-run: its leased rows come back after 2 s
            # What it may have had in flight: rows still leased to it once it is dead. (A
            # snapshot of the stand-in's ids would miss a batch it wrote just before dying
            # that the stand-in has not read yet.)
            in_flight = {
                str(row[0])
                for row in await query(
                    env,
                    "SELECT id FROM outbox WHERE status = 'sending' "
                    f"AND lease_owner LIKE '%:{workers[0].process.pid}:%'",
                )
            }
            await asyncio.gather(*posts)
        async with asyncio.timeout(60):
            await inngest.wait_until(lambda s: set(acknowledged) <= set(s.accepted_ids))
    finally:
        for api in apis:
            api.stop()
        workers[1].stop()
    counts = inngest.accepted_counts()
    assert set(counts) == set(acknowledged)
    # Sent twice only what the killed worker may have had in flight.
    assert {i for i, n in counts.items() if n > 1} <= in_flight


@contextlib.asynccontextmanager
async def hot_connections(db_url: str, size: int) -> AsyncIterator[HotConnections]:
    hot = HotConnections(asyncpg_dsn(db_url), size)
    try:
        yield hot
    finally:
        await hot.close()


async def backend_pid(conn: Any) -> int:
    return int(await conn.fetchval("SELECT pg_backend_pid()"))


@on_postgres
async def test_hot_connections_are_kept_between_statements_and_lent_one_at_a_time(
    db_url: str,
) -> None:
    async with hot_connections(db_url, 2) as hot:
        first = await hot.run(backend_pid)
        assert await hot.run(backend_pid) == first  # kept, not reopened
        held = asyncio.Event()
        release = asyncio.Event()

        async def hold(conn: Any) -> int:
            held.set()
            await release.wait()
            return await backend_pid(conn)

        holding = [asyncio.create_task(hot.run(hold)) for _ in range(2)]
        await held.wait()
        waiting = asyncio.create_task(hot.run(backend_pid))
        await asyncio.sleep(0)  # every task has had its turn: the third waits
        assert not waiting.done()
        assert hot.open == 2
        release.set()
        pids = await asyncio.gather(*holding)
        assert len(set(pids)) == 2 and first in pids  # two connections at once, no third
        assert await waiting in pids  # the one given back, not a new one
        assert hot.open == 2
    assert hot.open == 0


@on_postgres
async def test_after_close_a_connection_given_back_is_closed_and_a_waiter_refused(
    db_url: str,
) -> None:
    release = asyncio.Event()
    started = asyncio.Event()

    async def hold(conn: Any) -> Any:
        started.set()
        await release.wait()
        return conn

    async with hot_connections(db_url, 1) as hot:
        holding = asyncio.create_task(hot.run(hold))
        await started.wait()
        waiting = asyncio.create_task(hot.run(backend_pid))
        await asyncio.sleep(0)  # its turn: it waits for the one connection
    with pytest.raises(DatabaseClosed):
        await waiting
    with pytest.raises(DatabaseClosed):
        await hot.run(backend_pid)
    assert hot.open == 1  # still lent
    release.set()
    conn = await holding
    assert conn.is_closed()
    assert hot.open == 0


@on_postgres
async def test_a_row_the_server_refuses_keeps_its_connection_other_errors_drop_it(
    db_url: str,
) -> None:
    async with hot_connections(db_url, 1) as hot:
        first = await hot.run(backend_pid)
        with pytest.raises(asyncpg.DivisionByZeroError):  # a value: SQLSTATE class 22
            await hot.run(lambda conn: conn.fetchval("SELECT 1 / 0"))
        with pytest.raises(asyncpg.UniqueViolationError):  # a constraint: class 23
            await hot.run(
                lambda conn: conn.execute(
                    "INSERT INTO users (username, password_hash, created_at)"
                    " VALUES ('a', 'x', now()), ('a', 'x', now())"
                )
            )
        assert await hot.run(backend_pid) == first
        # Any other error is not taken on trust: the connection goes.
        with pytest.raises(asyncpg.UndefinedTableError):
            await hot.run(lambda conn: conn.fetchval("SELECT 1 FROM no_such_table"))
        second = await hot.run(backend_pid)
        assert second != first
        first = second

        async def open_a_transaction_and_fail(conn: Any) -> None:
            await conn.execute("BEGIN")
            await conn.fetchval("SELECT 1 / 0")

        # A transaction left open (aborted) is never lent again: the next
        # statement would fail in it, or worse, commit inside it.
        with pytest.raises(asyncpg.DivisionByZeroError):
            await hot.run(open_a_transaction_and_fail)
        assert await hot.run(backend_pid) != first


@on_postgres
async def test_a_cancelled_statement_drops_its_connection_and_a_waiter_gets_a_fresh_one(
    db_url: str,
) -> None:
    async with hot_connections(db_url, 1) as hot:
        first = await hot.run(backend_pid)
        sent = asyncio.Event()

        async def sleep(conn: Any) -> None:
            sent.set()  # the task goes on to send the statement before the test resumes
            await conn.execute("SELECT pg_sleep(30)")

        sleeping = asyncio.create_task(hot.run(sleep))
        waiting = asyncio.create_task(hot.run(backend_pid))
        await sent.wait()
        sleeping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sleeping
        async with asyncio.timeout(10):
            second = await waiting  # woken to open a connection of its own
        assert second != first
        assert hot.open == 1


@on_postgres
async def test_a_connection_lost_between_statements_is_replaced(db_url: str) -> None:
    async def itself(conn: Any) -> Any:
        return conn

    async with hot_connections(db_url, 1) as hot:
        idle = await hot.run(itself)
        first = await backend_pid(idle)  # on the test's own: the connection is idle
        admin = await asyncpg.connect(asyncpg_dsn(db_url))
        try:
            assert await admin.fetchval("SELECT pg_terminate_backend($1, 10000)", first)
        finally:
            await admin.close()
        await until(idle.is_closed)  # asyncpg has read the server's goodbye
        # Not lent: the next statement runs on a connection of its own.
        assert await hot.run(backend_pid) != first
        assert hot.open == 1


@on_postgres
async def test_a_connection_lost_mid_statement_is_not_lent_again(db_url: str) -> None:
    async with hot_connections(db_url, 1) as hot:
        first = await hot.run(backend_pid)

        async def lose_it(conn: Any) -> None:
            await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")

        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
            await hot.run(lose_it)
        assert await hot.run(backend_pid) != first
        assert hot.open == 1


@on_postgres
async def test_a_statement_cancelled_while_it_waits_for_a_connection_takes_none(
    db_url: str,
) -> None:
    async with hot_connections(db_url, 1) as hot:
        release = asyncio.Event()

        async def hold(conn: Any) -> int:
            await release.wait()
            return await backend_pid(conn)

        holder = asyncio.create_task(hot.run(hold))
        await asyncio.sleep(0)
        given_up = asyncio.create_task(hot.run(backend_pid))
        after = asyncio.create_task(hot.run(backend_pid))
        await asyncio.sleep(0)
        given_up.cancel()
        release.set()
        pid = await holder
        assert await after == pid  # the connection went past the cancelled waiter
        assert given_up.cancelled()
        assert hot.open == 1


@on_postgres
async def test_a_waiter_cancelled_as_it_is_handed_a_connection_passes_it_on(
    db_url: str,
) -> None:
    async with hot_connections(db_url, 1) as hot:
        waiters: list[asyncio.Task[int]] = []

        async def hand_over(conn: Any) -> int:
            pid = await backend_pid(conn)
            # Scheduled before the hand-over that follows this return: the
            # first waiter is cancelled with the connection already its own.
            asyncio.get_running_loop().call_soon(waiters[0].cancel)
            return pid

        holder = asyncio.create_task(hot.run(hand_over))
        waiters.append(asyncio.create_task(hot.run(backend_pid)))
        waiters.append(asyncio.create_task(hot.run(backend_pid)))
        async with asyncio.timeout(10):  # a connection lost with the waiter: the next waits on
            pid = await holder
            assert await waiters[1] == pid
        assert waiters[0].cancelled()
        assert hot.open == 1


@on_postgres
async def test_a_hot_write_cancelled_before_it_began_is_answered(db: Database) -> None:
    outcomes: list[tuple[Any, BaseException | None]] = []
    db.insert_relayed([], None, lambda result, error: outcomes.append((result, error)))
    (write,) = db._submitted  # the write's task, not yet run: shutting down cancels it
    write.cancel()
    await until(lambda: bool(outcomes))
    assert len(outcomes) == 1 and outcomes[0][0] is None
    assert isinstance(outcomes[0][1], DatabaseClosed)


@on_postgres
async def test_the_moves_out_of_sending_find_their_rows_by_id_not_in_the_sending_index(
    db: Database,
) -> None:
    """The sending index keeps the old version of every row delivered since
    the last vacuum; a mark that went through it would walk them all."""
    now = datetime.now(UTC)
    delivered = [new_event(now) for _ in range(400)]
    await outbox.enqueue(db, delivered)
    async with asyncpg_connection(db.url) as conn:
        await conn.execute("ALTER TABLE outbox SET (autovacuum_enabled = false)")
    done = await outbox.claim_batch(db, owner="w", limit=400, lease_seconds=30, now=now)
    assert await outbox.mark_delivered(db, [e.id for e in delivered], done.token, now=now) == 400
    leased = [new_event(now) for _ in range(5)]
    await outbox.enqueue(db, leased)
    claim = await outbox.claim_batch(db, owner="w", limit=5, lease_seconds=30, now=now)
    ids = [e.id for e in leased]
    async with asyncpg_connection(db.url) as conn:
        await conn.execute("ANALYZE outbox")  # the planner knows how few rows are sending
        plan = await conn.fetchval(
            "EXPLAIN (FORMAT JSON) " + outbox_sql.DELIVERED_MARK, now, claim.token, ids
        )
    assert _indexes_in(json.loads(plan)) == {"pk_outbox"}
    assert await outbox.mark_delivered(db, ids, claim.token, now=now) == 5


def new_event(at: datetime) -> NewEvent:
    event_id = new_event_id()
    return NewEvent(event_id, "test/event", RawJSON(f'{{"id":"{event_id}"}}'), at)


@contextlib.asynccontextmanager
async def asyncpg_connection(url: str) -> AsyncIterator[Any]:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        yield conn
    finally:
        await conn.close()


def _indexes_in(plan: Any) -> set[str]:
    if isinstance(plan, dict):
        found = {plan["Index Name"]} if "Index Name" in plan else set()
        return found.union(*(_indexes_in(v) for v in plan.values()))
    if isinstance(plan, list):
        return set().union(*(_indexes_in(v) for v in plan))
    return set()
