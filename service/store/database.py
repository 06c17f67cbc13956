"""The storage boundary (``Database``): ``engine`` for reads, ``write()`` for
writes, and the verbs the domain needs, each a promise every backend keeps.

Reads go through one AsyncEngine (aiosqlite or asyncpg). Writes go through
``Database.write(job)``, where a job is a plain function of a SQLAlchemy
Connection run inside a transaction, and through the verbs below, which each
backend implements its own way (``sqlite/database.py``, ``postgres/database.py``;
``service.store.open_database`` picks one from the URL):

- On SQLite, every write of the process runs on ONE thread with ONE
  connection (sqlite/writer.py), the intake's rows through a process of their
  own (sqlite/rows_process.py).
- On PostgreSQL, a job runs in a transaction of its own on the async engine;
  the server handles concurrent writers, and a NOTIFY wakes other hosts.
"""

from __future__ import annotations

import abc
import asyncio
import json
import logging
from collections.abc import Callable, Coroutine, Sequence
from datetime import datetime
from typing import Any, Protocol, TypeVar

from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from .contract import Claim, HandOff, NewEvent, RelayRequest, Submission
from .encoding import dumps
from .errors import DatabaseClosed
from .sqlite import connection as sqlite_rules
from .statements import DELIVERED

log = logging.getLogger(__name__)
T = TypeVar("T")
Job = Callable[[Connection], T]
# Called on the caller's event loop with (result, None) or (None, error).
Done = Callable[[Any, BaseException | None], None]


def create_engine(url: str, *, foreign_keys: bool = True, **kwargs: Any) -> AsyncEngine:
    engine = create_async_engine(
        url,
        json_serializer=dumps,
        json_deserializer=json.loads,
        # Statement parameters hold documents, events and password hashes:
        # keep them out of error messages and so out of the logs.
        hide_parameters=True,
        **kwargs,
    )
    if engine.dialect.name == "sqlite":
        sqlite_rules.check_version()
        sqlite_rules.configure(engine, foreign_keys=foreign_keys)
    return engine


class PendingSubmission(Protocol):
    """A request waiting for its commit: its submission (or relay request), and
    the future that answers it (a cancelled one is left out of a transaction
    not yet begun)."""

    submission: Submission | RelayRequest
    future: asyncio.Future[Any]


# What insert_submissions gives ``done``: each request's result (None: left
# out, cancelled), and the events written.
Written = tuple[list[Any], list[NewEvent]]


class RowsRefused(Exception):
    """The database refused a row (a constraint): nothing of the write was kept,
    and the same rows would be refused again."""


class Database(abc.ABC):
    """The storage boundary: ``engine`` for reads, ``write()`` for writes, and
    the verbs the domain needs.

    A backend subclasses it and implements each abstract verb; the rest have a
    default that runs on the async engine, which a backend may override when it
    does better. tests/test_store_contract.py is the contract: a backend
    passes it or it is not done.
    """

    # How many of the intake's batches the store takes at once. SQLite's writer
    # groups the batches waiting for it into one transaction; a backend that
    # runs each batch as a statement of its own may want fewer, larger ones.
    batches_in_flight = 4

    def __init__(self, url: str, **engine_kwargs: Any) -> None:
        self.url = url
        self.engine = create_engine(url, **engine_kwargs)
        self._closed = False
        self._submitted: set[asyncio.Task[Any]] = set()  # submit()'s writes
        # The store's one injectable fault point: called inside the intake's
        # transaction, after its rows and before COMMIT (tests: a failure
        # there, or a commit held open).
        self.before_commit: Callable[[], None] | None = None

    async def start(self) -> None:
        """Start what the backend runs beside the engine (threads, processes)."""
        return None

    async def write(self, job: Job[T]) -> T:
        """Run ``job`` in a transaction and commit; raise what it raised, nothing kept."""
        if self._closed:
            raise DatabaseClosed()
        async with self.engine.begin() as conn:
            return await conn.run_sync(job)

    def submit(self, job: Job[T], done: Done) -> None:
        """``write`` without awaiting: ``done(result, error)`` on this loop once it has ended."""
        if self._closed:
            raise DatabaseClosed()
        task = asyncio.get_running_loop().create_task(self.write(job))
        self._submitted.add(task)
        task.add_done_callback(lambda t: self._finish_submitted(t, done))

    def _finish_submitted(self, task: asyncio.Task[Any], done: Done) -> None:
        self._submitted.discard(task)
        if task.cancelled():
            done(None, DatabaseClosed())
        elif (error := task.exception()) is not None:
            done(None, error)
        else:
            done(task.result(), None)

    # -- the verbs a backend implements ------------------------------------------------

    @abc.abstractmethod
    def insert_submissions(
        self, batch: Sequence[PendingSubmission], hand_off: HandOff | None, done: Done
    ) -> None:
        """Each submission's document and event in one transaction, then ``done``.

        The events are pending, or leased by ``hand_off``; a request cancelled
        before the transaction began is left out; a batch is all with
        Idempotency-Keys (a key used before answers for its first request) or
        none. ``done(Written, None)`` once committed; ``done(None, error)`` if
        nothing was, RowsRefused when the database refused a row.
        """

    @abc.abstractmethod
    def insert_relayed(
        self, batch: Sequence[PendingSubmission], hand_off: HandOff | None, done: Done
    ) -> None:
        """Each relay request's events, with its key's name as origin, in one transaction.

        An id already in the outbox, or met earlier in the batch, is not
        written again (counted by the first request that holds it); the keys
        are marked used; otherwise as insert_submissions, each request's
        result a Relayed.
        """

    @abc.abstractmethod
    def enqueue(
        self, conn: Connection, events: Sequence[NewEvent], hand_off: HandOff | None = None
    ) -> None:
        """New rows in the caller's transaction: pending (woken at commit), or ``hand_off``'s."""

    @abc.abstractmethod
    def serialize(self, conn: Connection, keys: Sequence[str]) -> None:
        """From here to their ends, transactions naming a key in common run one at a time."""

    @abc.abstractmethod
    async def claim(
        self, *, token: str, owner: str, limit: int, now: datetime, expires_at: datetime
    ) -> Claim:
        """Lease and commit up to ``limit`` due rows, no row any other claim holds.

        Expired leases first, then pending rows due at ``now``, each oldest first.
        """

    @abc.abstractmethod
    def minute_of(self, column: Any) -> Any:
        """SQL for the UTC minute a timestamp falls in, read back as an aware datetime."""

    # -- the verbs with a default ---------------------------------------------------------

    def notify(self, conn: Connection) -> None:
        """Wake other processes' workers at the caller's commit (default: none; they poll)."""
        return None

    def listen(self, wake: asyncio.Event) -> Coroutine[Any, Any, None] | None:
        """What sets ``wake`` at another process's notify, or None (default): the worker polls."""
        return None

    async def mark_delivered(self, ids: Sequence[str], token: str, now: datetime) -> int:
        """sending -> delivered for the rows of ``ids`` lease ``token`` holds; how many."""
        values = {"ids": list(ids), "token": token, "now": now}
        return await self.write(lambda conn: conn.execute(DELIVERED, values).rowcount)

    # -- health and life ----------------------------------------------------------

    @property
    def writer_healthy(self) -> bool:
        return True

    @property
    def rows_process_lost(self) -> bool:
        """The SQLite rows process was started and has ended (see SQLite's wing)."""
        return False

    async def close(self) -> None:
        self._closed = True
        await self.engine.dispose()

    async def __aenter__(self) -> Database:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
