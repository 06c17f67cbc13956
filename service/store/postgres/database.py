"""The store on PostgreSQL: each write a transaction of its own; claims with FOR
UPDATE SKIP LOCKED, so that workers on many hosts never wait for nor take each
other's rows; a NOTIFY at the commit of new rows wakes every host's workers
(listener.py).

The hot path (the intake's documents and events, the claim, the delivered
mark) runs on asyncpg itself, one statement each (outbox_sql.py), on
connections of its own (connections.py); everything else on SQLAlchemy's
async engine."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection
from sqlalchemy.util import greenlet_spawn

from ...models import UTCDateTime, outbox
from ..contract import (
    Accepted,
    Claim,
    HandOff,
    NewEvent,
    Submission,
    lease_values,
)
from ..database import Database, Done, PendingSubmission, RowsRefused, T, Written
from ..errors import DatabaseClosed
from ..submissions import RelayedBatch, write_submissions
from . import outbox_sql
from .connections import HotConnections
from .listener import NOTIFY_SQL, Listener, asyncpg_dsn

# The hot path's connections: as many as the intake's batches in flight and the
# worker's sends, each a prepared statement's home.
HOT_CONNECTIONS = 8


def _outbox_row(event: NewEvent, lease: tuple[Any, ...]) -> dict[str, Any]:
    """A new outbox row's values, under ``lease`` (lease_values)."""
    status, owner, token, expires_at = lease
    return {
        "id": event.id,
        "event_name": event.name,
        "payload": event.payload,
        "status": status,
        "attempts": 0,
        "available_at": event.created_at,
        "created_at": event.created_at,
        "lease_owner": owner,
        "lease_token": token,
        "lease_expires_at": expires_at,
    }


class PostgresDatabase(Database):
    # Two batches at a time: one executes while the other waits for its WAL
    # flush, and the next grows meanwhile. More statements at once wake more
    # backends to compete for the host's cores than they gain (measured:
    # docs/performance.md, "PostgreSQL's hot path").
    batches_in_flight = 2

    def __init__(self, url: str, *, rows_process: bool = False, **engine_kwargs: Any) -> None:
        super().__init__(url, **engine_kwargs)  # rows_process: SQLite's alone
        self._hot: HotConnections | None = None  # once started

    async def start(self) -> None:
        self._hot = HotConnections(asyncpg_dsn(self.url), HOT_CONNECTIONS)

    async def close(self) -> None:
        await super().close()
        if self._hot is not None:
            # No hot write is left: the intake and the worker stop before the database.
            await self._hot.close()

    def _on_hot(self, job: Callable[[Any], Awaitable[T]], done: Done) -> None:
        """Run ``job(connection)`` on a hot connection; ``done`` as submit's."""
        if self._closed:
            raise DatabaseClosed()
        answered = [False]
        task = asyncio.get_running_loop().create_task(self._hot_then(job, done, answered))
        self._submitted.add(task)

        def ended(task: asyncio.Task[None]) -> None:
            self._submitted.discard(task)
            if not answered[0]:  # cancelled before its first step
                done(None, DatabaseClosed())

        task.add_done_callback(ended)

    async def _hot_then(
        self, job: Callable[[Any], Awaitable[T]], done: Done, answered: list[bool]
    ) -> None:
        # ``done`` is called from the statement's own task, not from a done
        # callback of it: under load that is one turn of the loop less
        # between the commit and the requests' answers.
        outcome: tuple[Any, BaseException | None] = (None, DatabaseClosed())  # if cancelled
        try:
            outcome = (await self._run_hot(job), None)
        except Exception as error:
            outcome = (None, error)
        finally:
            answered[0] = True
            done(*outcome)

    async def _run_hot(self, job: Callable[[Any], Awaitable[T]]) -> T:
        if self._closed:
            raise DatabaseClosed()
        return await self._hot.run(job)

    def insert_submissions(
        self, batch: Sequence[PendingSubmission], hand_off: HandOff | None, done: Done
    ) -> None:
        if batch and batch[0].submission.idempotency_key is None:
            # A batch is all with Idempotency-Keys or none: without, one statement.
            self._on_hot(
                lambda conn: self._insert_plain(conn, batch, hand_off), _refusals_named(done)
            )
            return
        self.submit(
            lambda conn: write_submissions(
                conn,
                batch,
                hand_off,
                insert=postgresql.insert,
                enqueue=self.enqueue,
                before_commit=self.before_commit,
            ),
            _refusals_named(done),
        )

    async def _insert_plain(
        self, conn: Any, batch: Sequence[PendingSubmission], hand_off: HandOff | None
    ) -> Written:
        # Left out: a request cancelled before its transaction began.
        results: list[Accepted | None] = []
        subs: list[Submission] = []
        for pending in batch:
            if pending.future.cancelled():
                results.append(None)
            else:
                subs.append(pending.submission)
                results.append(Accepted(pending.submission.event.id))
        if subs:
            args = outbox_sql.submission_args(subs, hand_off)
            if self.before_commit is None:
                await conn.execute(outbox_sql.SUBMISSIONS, *args)
            else:
                # The fault point needs a moment between the rows and COMMIT:
                # the same statement, in a transaction of its own.
                async with conn.transaction():
                    await conn.execute(outbox_sql.SUBMISSIONS, *args)
                    await greenlet_spawn(self.before_commit)
        return results, [s.event for s in subs]

    def insert_relayed(
        self, batch: Sequence[PendingSubmission], hand_off: HandOff | None, done: Done
    ) -> None:
        self._on_hot(
            lambda conn: self._insert_relayed(conn, batch, hand_off), _refusals_named(done)
        )

    async def _insert_relayed(
        self, conn: Any, batch: Sequence[PendingSubmission], hand_off: HandOff | None
    ) -> Written:
        relayed = RelayedBatch(batch)
        if not relayed.last_used:  # every request cancelled before its transaction
            return relayed.results(set())
        args = outbox_sql.relayed_args(relayed.rows, hand_off, relayed.last_used)
        if self.before_commit is None:
            records = await conn.fetch(outbox_sql.RELAYED, *args)
        else:
            async with conn.transaction():  # the fault point before COMMIT, as _insert_plain's
                records = await conn.fetch(outbox_sql.RELAYED, *args)
                await greenlet_spawn(self.before_commit)
        return relayed.results(outbox_sql.written_ids(records))

    def enqueue(
        self, conn: Connection, events: Sequence[NewEvent], hand_off: HandOff | None = None
    ) -> None:
        if not events:
            return
        lease = lease_values(hand_off)
        conn.execute(outbox.insert(), [_outbox_row(e, lease) for e in events])
        if hand_off is None:  # handed-off rows are this process's worker's already
            self.notify(conn)

    def serialize(self, conn: Connection, keys: Sequence[str]) -> None:
        # A transaction-scoped advisory lock a key, taken in order: no deadlock.
        for key in sorted(keys):
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(sa.func.hashtext(key))))

    def notify(self, conn: Connection) -> None:
        conn.exec_driver_sql(NOTIFY_SQL)  # delivered at commit, to every host's workers

    async def claim(
        self, *, token: str, owner: str, limit: int, now: datetime, expires_at: datetime
    ) -> Claim:
        rows = await self._run_hot(
            lambda conn: conn.fetch(outbox_sql.CLAIM, now, limit, owner, token, expires_at)
        )
        return outbox_sql.claimed(token, owner, rows)

    async def mark_delivered(self, ids: Sequence[str], token: str, now: datetime) -> int:
        # Every delivery ends here: one statement, its own transaction.
        status = await self._run_hot(
            lambda conn: conn.execute(outbox_sql.DELIVERED_MARK, now, token, list(ids))
        )
        return outbox_sql.row_count(status)

    def minute_of(self, column: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
        minute = sa.func.date_trunc("minute", sa.func.timezone("UTC", column))
        return sa.type_coerce(minute, UTCDateTime())

    def listen(self, wake: asyncio.Event) -> Coroutine[Any, Any, None]:
        return Listener(self.url, wake).run()


def _refusals_named(done: Done) -> Done:
    """A refused row (a constraint, a value out of range) reaches the intake as RowsRefused."""

    def answer(result: Any, error: BaseException | None) -> None:
        if isinstance(error, sa.exc.IntegrityError | sa.exc.DataError) or _refused_by_asyncpg(
            error
        ):
            refused = RowsRefused(str(error))
            refused.__cause__ = error
            error = refused
        done(result, error)

    return answer


def _refused_by_asyncpg(error: BaseException | None) -> bool:
    """A row asyncpg's statement was refused for: a constraint (SQLSTATE class
    23) or a value out of range or malformed (class 22)."""
    import asyncpg

    return isinstance(error, asyncpg.IntegrityConstraintViolationError | asyncpg.DataError)
