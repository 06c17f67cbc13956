"""Accepting documents: the business row and its outbox row, committed together.

Concurrent requests share commits (group commit): every submission that arrives
before the event loop comes round goes into one batch, the batch's rows are
written in ONE transaction with ONE commit (one fsync; on SQLite the requests
with an Idempotency-Key go as a job of their own, see _commit_split), and only
then is each request's future resolved. (The database groups the batches waiting for it
into one transaction too.) A request is answered after the commit that holds
its rows, never before, so an answer is as durable as a commit of its own, at
a fraction of the fsyncs.

A transaction holds whole submissions: a document row and its outbox row are
always written together or not at all, whatever is cancelled or fails.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DataError, IntegrityError

from . import outbox
from .models import documents
from .store.database import Database
from .store.errors import DatabaseClosed
from .store.postgres.listener import NOTIFY_SQL
from .store.sqlite.connection import sqlite_time

log = logging.getLogger(__name__)


# Built once per request: plain slots classes (a frozen dataclass's __init__
# goes through object.__setattr__ for every field).
@dataclass(slots=True)
class Submission:
    user_id: int
    document_name: str
    event: outbox.NewEvent
    idempotency_key: str | None = None
    request_hash: str | None = None


@dataclass(slots=True)
class Accepted:
    event_id: str
    # True when an earlier request with the same Idempotency-Key wrote it.
    replayed: bool = False


class IntakeError(Exception):
    """Base class of what a submission can fail with."""


class IdempotencyKeyReused(IntakeError):
    """The key was used before by this user with a different request body."""


class Overloaded(IntakeError):
    """The write queue is full: the database is not keeping up."""


class StorageUnavailable(IntakeError):
    """The transaction failed; nothing of the submission was written."""


class IntakeClosed(IntakeError):
    """The service is shutting down and accepts no more writes."""


@dataclass(slots=True)
class _Pending:
    submission: Submission
    future: asyncio.Future[Accepted]


# Hooks for tests, called inside the transaction (on the database's writer
# thread): between the document rows and the outbox rows (a failure there
# must leave nothing behind), and just before COMMIT (no answer yet). On the
# SQLite fast path one statement writes both rows: both run after it.
TransactionHook = Callable[[], None]


# The hot path on SQLite: both rows of every submission of the batches waiting
# for the writer by ONE statement (Database.submit_rows), an INSERT into a view
# whose trigger writes the documents and their outbox rows. One statement is
# one step of the driver, so one wait for the GIL on the writer thread, and is
# atomic by itself: a document is never kept without its event. TEMP objects
# live on the writer's connection only; the schema knows nothing of them.
# A row: [user_id, document_name, event_id, created_at, event_name, payload].
# The lease (outbox.sqlite_lease) is the batch's, a parameter of its own: the
# rows' JSON is parsed again for every value taken from it, and the lease is
# four of a row's ten values.
_SQLITE_LEASE = ("status", "lease_owner", "lease_token", "lease_expires_at")
_SQLITE_SETUP = (
    f"CREATE TEMP VIEW IF NOT EXISTS intake_rows (rows, {', '.join(_SQLITE_LEASE)})"
    " AS SELECT NULL, NULL, NULL, NULL, NULL",
    "CREATE TEMP TRIGGER IF NOT EXISTS intake_rows_insert"
    " INSTEAD OF INSERT ON intake_rows BEGIN"
    " INSERT INTO documents (user_id, document_name, event_id, created_at)"
    " SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'),"
    " json_extract(value, '$[2]'), json_extract(value, '$[3]')"
    " FROM json_each(NEW.rows); "
    + outbox.sqlite_enqueue_from("NEW.rows", first=2, lease=[f"NEW.{c}" for c in _SQLITE_LEASE])
    + "; END",
)
_SQLITE_INSERT = (
    f"INSERT INTO intake_rows (rows, {', '.join(_SQLITE_LEASE)}) VALUES (?, ?, ?, ?, ?)"
)


class _SQLiteRows:
    """A batch's rows for the writer (see store.sqlite.writer.Rows): encoded here, on the event
    loop, as the batch goes; taken, less the requests cancelled meanwhile, on
    the writer thread when its transaction runs, or as they are handed to the
    rows process (service.rows_process)."""

    __slots__ = ("_batch", "_texts", "_kept", "check", "params")
    sql = _SQLITE_INSERT
    setup = _SQLITE_SETUP

    def __init__(
        self,
        batch: list[_Pending],
        hand_off: outbox.HandOff | None,
        check: Callable[[], None] | None,
    ) -> None:
        self.params = outbox.sqlite_lease(hand_off)
        self._batch = batch
        self._texts = [
            orjson.dumps(
                (
                    (s := p.submission).user_id,
                    s.document_name,
                    (e := s.event).id,
                    sqlite_time(e.created_at),
                    e.name,
                    e.payload,
                )
            ).decode()
            for p in batch
        ]
        self._kept: list[bool] = []
        self.check = check

    def take(self) -> list[str]:
        self._kept = [not p.future.cancelled() for p in self._batch]
        return [text for text, kept in zip(self._texts, self._kept, strict=True) if kept]

    def committed(self, raw: sqlite3.Connection) -> bool:
        batch = zip(self._batch, self._kept, strict=True)
        ids = [p.submission.event.id for p, kept in batch if kept]
        (found,) = raw.execute(
            "SELECT count(*) FROM outbox WHERE id IN (SELECT value FROM json_each(?))",
            (orjson.dumps(ids).decode(),),
        ).fetchone()
        return bool(found)  # one statement wrote them all, or none

    def written(self) -> tuple[list[Accepted | IntakeError | None], list[outbox.NewEvent]]:
        results: list[Accepted | IntakeError | None] = []
        fresh: list[outbox.NewEvent] = []
        for pending, kept in zip(self._batch, self._kept, strict=True):
            if kept:
                results.append(Accepted(pending.submission.event.id))
                fresh.append(pending.submission.event)
            else:
                results.append(None)
        return results, fresh


class HandOffTarget(Protocol):
    """Takes new events from their commit (the delivery worker of this process)."""

    def offer(self) -> outbox.HandOff | None:
        """A lease to write the next batch's events under, or None (write them pending)."""

    def accept(self, hand_off: outbox.HandOff, events: list[outbox.NewEvent]) -> None:
        """Committed under ``hand_off``: now the target's to deliver."""

    def decline(self, hand_off: outbox.HandOff) -> None:
        """Nothing was written under ``hand_off``."""


class DocumentIntake:
    def __init__(
        self,
        db: Database,
        *,
        queue_limit: int = 4096,
        batch_limit: int = 512,
        batches_in_flight: int = 4,
        on_commit: Callable[[int], None] | None = None,
    ) -> None:
        self._db = db
        self._dialect = db.dialect
        self._waiting: collections.deque[_Pending] = collections.deque()
        self._flush_scheduled = False
        self._in_flight = 0  # batches given to the database, not yet answered
        self._batches_in_flight = batches_in_flight
        self._limit = queue_limit
        self._outstanding = 0
        self._batch_limit = batch_limit
        self._on_commit = on_commit
        self._closed = False
        self._started = False
        self._idle = asyncio.Event()
        self._hand_off_to: HandOffTarget | None = None
        self.hook_mid_transaction: TransactionHook | None = None
        self.hook_before_commit: TransactionHook | None = None
        self.commits = 0

    def hand_off_to(self, target: HandOffTarget | None) -> None:
        """New events go to ``target`` straight from their commit, when it offers
        a lease (this process's worker); None: they are only written, pending."""
        self._hand_off_to = target

    @property
    def queued(self) -> int:
        """Requests waiting for their commit."""
        return self._outstanding

    async def submit(self, submission: Submission) -> Accepted:
        """Write the submission durably; return once it is committed."""
        if self._closed or not self._started:
            raise IntakeClosed()
        # The bound counts every request waiting for its commit, queued or in
        # a batch on its way: past it, the caller answers 503 at once.
        if self._outstanding >= self._limit:
            raise Overloaded()
        # The loop captured at start: asyncio.get_running_loop() makes a
        # getpid() system call on every call in Python 3.11.
        pending = _Pending(submission, self._loop.create_future())
        self._waiting.append(pending)
        self._outstanding += 1
        if not self._flush_scheduled:
            # Whatever arrives until the loop comes round goes in one batch.
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        try:
            # If this await is cancelled, the future is cancelled with it: the
            # writer skips it if its transaction has not begun; if it has,
            # that transaction commits or rolls back whole.
            return await pending.future
        finally:
            self._outstanding -= 1

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._started = True

    async def close(self) -> None:
        """Commit what is waiting, then refuse more."""
        self._closed = True
        while self._waiting or self._in_flight:
            self._idle.clear()
            self._flush()
            if self._waiting or self._in_flight:
                await self._idle.wait()

    def _flush(self) -> None:
        """Give the waiting requests to the database in batches, as many batches
        as may be in flight: the database groups the batches waiting for it into
        one transaction, and a bounded number keeps batches large."""
        self._flush_scheduled = False
        while self._waiting and self._in_flight < self._batches_in_flight:
            batch: list[_Pending] = []
            while self._waiting and len(batch) < self._batch_limit:
                pending = self._waiting.popleft()
                if not pending.future.done():  # not cancelled while it waited
                    batch.append(pending)
            if batch:
                self._commit_split(batch)
        if not self._waiting and not self._in_flight:
            self._idle.set()

    def _commit_split(self, batch: list[_Pending]) -> None:
        """On SQLite, requests with an Idempotency-Key need a statement each
        (the key may be taken): they go as a job of their own (which may share
        the writer's transaction), and the others still take the one-statement
        path (_SQLiteRows). A split batch counts as two in flight."""
        if self._dialect == "sqlite":
            keyed = [p for p in batch if p.submission.idempotency_key is not None]
            if keyed and len(keyed) < len(batch):
                try:
                    self._commit([p for p in batch if p.submission.idempotency_key is None])
                finally:
                    # Out of the queue already: whatever the first half raised,
                    # the keyed requests must still get an answer.
                    self._commit(keyed)
                return
        self._commit(batch)

    def _commit(self, batch: list[_Pending]) -> None:
        """Start the batch's transaction; ``_committed`` gets its outcome.

        No task and no future per batch: on SQLite the writer thread's one
        wake-up of the loop per transaction answers every request in it.
        """
        target = self._hand_off_to
        hand_off = None
        if target is not None:
            try:
                hand_off = target.offer()
            except Exception:
                log.exception("the hand-off target failed to offer; the rows are written pending")
        self._in_flight += 1

        def done(outcome: Any, error: BaseException | None) -> None:
            self._committed(batch, target, hand_off, outcome, error)

        try:
            if self._dialect == "sqlite" and all(
                p.submission.idempotency_key is None for p in batch
            ):
                hooked = self.hook_mid_transaction or self.hook_before_commit
                check = self._run_hooks if hooked else None
                self._db.submit_rows(_SQLiteRows(batch, hand_off, check), done)
            else:
                self._db.submit(lambda conn: self._write_rows(conn, batch, hand_off), done)
        except Exception as error:  # closed, or the rows failed to encode: nothing written
            self._committed(batch, target, hand_off, None, error)

    def _committed(
        self,
        batch: list[_Pending],
        target: HandOffTarget | None,
        hand_off: outbox.HandOff | None,
        outcome: tuple[list[Accepted | IntakeError | None], list[outbox.NewEvent]] | None,
        error: BaseException | None,
    ) -> None:
        self._in_flight -= 1
        try:
            try:
                if outcome is not None:
                    self._answer(batch, *outcome, handed_off=hand_off is not None)
                else:
                    self._failed(batch, error)
            finally:
                # Committed or not, whatever else failed here.
                if target is not None and hand_off is not None:
                    if outcome is None:
                        target.decline(hand_off)
                    else:
                        target.accept(hand_off, outcome[1])
        finally:
            self._flush()  # the next batch, and close()'s wake-up

    def _answer(
        self,
        batch: list[_Pending],
        results: list[Accepted | IntakeError | None],
        fresh: list[outbox.NewEvent],
        *,
        handed_off: bool,
    ) -> None:
        self.commits += 1
        for pending, result in zip(batch, results, strict=True):
            if pending.future.done():
                continue
            if isinstance(result, Exception):
                pending.future.set_exception(result)
            elif result is not None:
                pending.future.set_result(result)
        if not handed_off and self._on_commit is not None:
            self._on_commit(len(fresh))

    def _failed(self, batch: list[_Pending], error: BaseException | None) -> None:
        """Nothing of the batch was written."""
        if isinstance(error, DatabaseClosed | asyncio.CancelledError):
            _fail(batch, IntakeClosed())
        elif isinstance(error, IntegrityError | DataError | sqlite3.IntegrityError):
            if len(batch) == 1:
                log.error(
                    "a submission was refused by the database; nothing was written",
                    exc_info=error,
                )
                _fail(batch, StorageUnavailable())
            else:
                # One bad row must not fail the requests that shared its
                # commit: bisect until it stands alone.
                middle = len(batch) // 2
                self._commit(batch[:middle])
                self._commit(batch[middle:])
        else:
            log.error(
                "group commit of %d submissions failed; none was written",
                len(batch),
                exc_info=error,
            )
            _fail(batch, StorageUnavailable())

    def _write_rows(
        self, conn: Connection, batch: list[_Pending], hand_off: outbox.HandOff | None = None
    ) -> tuple[list[Accepted | IntakeError | None], list[outbox.NewEvent]]:
        """Both rows of every submission, in the caller's transaction; each
        request's result, and the new events written.

        Runs on the database's writer thread. A request cancelled before its
        transaction began is left out (None); one cancelled later is written
        whole, so a retry with its Idempotency-Key finds it.
        """
        results: list[Accepted | IntakeError | None] = []
        plain: list[Submission] = []
        fresh: list[outbox.NewEvent] = []
        for pending in batch:
            if pending.future.cancelled():
                results.append(None)
                continue
            sub = pending.submission
            if sub.idempotency_key is None:
                plain.append(sub)
                fresh.append(sub.event)
                results.append(Accepted(sub.event.id))
                continue
            result = self._insert_keyed(conn, sub)
            results.append(result)
            if isinstance(result, Accepted) and not result.replayed:
                fresh.append(sub.event)
        if plain:  # PostgreSQL: on SQLite they take _SQLiteRows (see _commit_split)
            conn.execute(documents.insert(), [_document_row(s) for s in plain])
        if self.hook_mid_transaction is not None:
            self.hook_mid_transaction()
        outbox.enqueue(conn, fresh, hand_off)
        if fresh and hand_off is None and self._dialect == "postgresql":
            # Delivered at commit, to the workers of every host.
            conn.exec_driver_sql(NOTIFY_SQL)
        if self.hook_before_commit is not None:
            self.hook_before_commit()
        return results, fresh

    def _run_hooks(self) -> None:
        # On the fast path both rows are written by one statement: there is no
        # point between them, so both hooks run after it.
        if self.hook_mid_transaction is not None:
            self.hook_mid_transaction()
        if self.hook_before_commit is not None:
            self.hook_before_commit()

    def _insert_keyed(self, conn: Connection, sub: Submission) -> Accepted | IntakeError:
        """Insert unless this user already used the key (then answer as the first time)."""
        insert = postgresql.insert if self._dialect == "postgresql" else sqlite.insert
        statement = (
            insert(documents)
            .values(_document_row(sub))
            .on_conflict_do_nothing(index_elements=["user_id", "idempotency_key"])
            .returning(documents.c.id)
        )
        if conn.execute(statement).first() is not None:
            return Accepted(sub.event.id)
        first = conn.execute(
            sa.select(documents.c.event_id, documents.c.request_hash).where(
                documents.c.user_id == sub.user_id,
                documents.c.idempotency_key == sub.idempotency_key,
            )
        ).one()
        if first.request_hash != sub.request_hash:
            return IdempotencyKeyReused()
        return Accepted(first.event_id, replayed=True)


def _document_row(sub: Submission) -> dict[str, object]:
    return {
        "user_id": sub.user_id,
        "document_name": sub.document_name,
        "event_id": sub.event.id,
        "idempotency_key": sub.idempotency_key,
        "request_hash": sub.request_hash,
        "created_at": sub.event.created_at,
    }


def _fail(batch: list[_Pending], error: IntakeError) -> None:
    for pending in batch:
        if not pending.future.done():
            pending.future.set_exception(error)
