"""Accepting documents: the business row and its outbox row, committed together.

Concurrent requests share commits (group commit): every submission that arrives
before the event loop comes round goes into one batch, the batch's rows are
written in ONE transaction with ONE commit (one fsync; the requests with an
Idempotency-Key go as a batch of their own, see _commit_split), and only then
is each request's future resolved. (The database groups the batches waiting for it
into one transaction too.) A request is answered after the commit that holds
its rows, never before, so an answer is as durable as a commit of its own, at
a fraction of the fsyncs.

A transaction holds whole submissions: a document row and its outbox row are
always written together or not at all, whatever is cancelled or fails.

Relay requests (POST /e/{key}: a request's events, no document) share the
same commits in batches of their own, a whole request in one transaction.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from . import outbox
from .store.contract import (
    Accepted,
    IdempotencyKeyReused,
    IntakeError,
    Relayed,
    RelayRequest,
    Submission,
)
from .store.database import Database, RowsRefused, Written
from .store.errors import DatabaseClosed

__all__ = [
    "Accepted",
    "DocumentIntake",
    "HandOffTarget",
    "IdempotencyKeyReused",
    "IntakeClosed",
    "IntakeError",
    "Overloaded",
    "Relayed",
    "RelayRequest",
    "StorageUnavailable",
    "Submission",
]

log = logging.getLogger(__name__)

# A relay batch ends at this many events (or at the batch limit's requests),
# so that one transaction stays short however large the requests.
RELAY_BATCH_EVENTS = 10_000


class Overloaded(IntakeError):
    """The write queue is full: the database is not keeping up."""


class StorageUnavailable(IntakeError):
    """The transaction failed; nothing of the submission was written."""


class IntakeClosed(IntakeError):
    """The service is shutting down and accepts no more writes."""


@dataclass(slots=True)
class _Pending:
    submission: Submission | RelayRequest
    future: asyncio.Future[Any]


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
        batches_in_flight: int | None = None,
        on_commit: Callable[[int], None] | None = None,
    ) -> None:
        self._db = db
        self._waiting: collections.deque[_Pending] = collections.deque()
        self._relays: collections.deque[_Pending] = collections.deque()
        self._flush_scheduled = False
        self._in_flight = 0  # batches given to the database, not yet answered
        # None: as many as the store takes at once.
        self._batches_in_flight = (
            db.batches_in_flight if batches_in_flight is None else batches_in_flight
        )
        self._limit = queue_limit
        self._outstanding = 0
        self._batch_limit = batch_limit
        self._on_commit = on_commit
        self._closed = False
        self._started = False
        self._idle = asyncio.Event()
        self._hand_off_to: HandOffTarget | None = None
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
        return await self._enqueue(submission, self._waiting)  # type: ignore[no-any-return]

    async def relay(self, request: RelayRequest) -> Relayed:
        """Write the request's events durably (those whose id the outbox does
        not hold yet); return once they are committed."""
        return await self._enqueue(request, self._relays)  # type: ignore[no-any-return]

    async def _enqueue(
        self, submission: Submission | RelayRequest, queue: collections.deque[_Pending]
    ) -> Any:
        if self._closed or not self._started:
            raise IntakeClosed()
        # The bound counts every request waiting for its commit, queued or in
        # a batch on its way: past it, the caller answers 503 at once.
        if self._outstanding >= self._limit:
            raise Overloaded()
        # The loop captured at start: asyncio.get_running_loop() makes a
        # getpid() system call on every call in Python 3.11.
        pending = _Pending(submission, self._loop.create_future())
        queue.append(pending)
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
        while self._waiting or self._relays or self._in_flight:
            self._idle.clear()
            self._flush()
            if self._waiting or self._relays or self._in_flight:
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
            if self._relays and self._in_flight < self._batches_in_flight:
                self._commit_relays()  # one batch each in turn: neither waits for the other
        while self._relays and self._in_flight < self._batches_in_flight:
            self._commit_relays()
        if not self._waiting and not self._relays and not self._in_flight:
            self._idle.set()

    def _commit_relays(self) -> None:
        batch: list[_Pending] = []
        events = 0
        while self._relays and len(batch) < self._batch_limit and events < RELAY_BATCH_EVENTS:
            pending = self._relays.popleft()
            if not pending.future.done():
                batch.append(pending)
                events += len(pending.submission.events)  # type: ignore[union-attr]
        if batch:
            self._commit(batch)

    def _commit_split(self, batch: list[_Pending]) -> None:
        """Requests with an Idempotency-Key need a statement each (the key may
        be taken): they go as a batch of their own, and the others keep the
        store's fastest path. A split batch counts as two in flight."""
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

        No task and no future per batch: on SQLite the writer's one wake-up of
        the loop per transaction answers every request in it.
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
            if isinstance(batch[0].submission, RelayRequest):
                self._db.insert_relayed(batch, hand_off, done)
            else:
                self._db.insert_submissions(batch, hand_off, done)
        except Exception as error:  # closed, or the rows failed to encode: nothing written
            self._committed(batch, target, hand_off, None, error)

    def _committed(
        self,
        batch: list[_Pending],
        target: HandOffTarget | None,
        hand_off: outbox.HandOff | None,
        outcome: Written | None,
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
        results: list[Accepted | Relayed | IntakeError | None],
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
        elif isinstance(error, RowsRefused):
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


def _fail(batch: list[_Pending], error: IntakeError) -> None:
    for pending in batch:
        if not pending.future.done():
            pending.future.set_exception(error)
