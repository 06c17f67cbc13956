"""The hot path's asyncpg connections: each kept open between statements (its
prepared statements live on it) and lent to one statement at a time.

asyncpg's Pool would do the lending, but its release runs in a task of its own
(asyncio.shield) and awaits a reset: under load every such step waits a turn
of a busy event loop, and the requests of a group commit wait with it. Here a
statement that ends gives its connection back at once, without an await. A
connection whose statement did not end with PostgreSQL's own error (lost,
cancelled, timed out) is closed and never lent again; the next statement
opens a fresh one.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

T = TypeVar("T")


class HotConnections:
    """Up to ``size`` connections to ``dsn``, opened when first needed."""

    def __init__(self, dsn: str, size: int) -> None:
        self._dsn = dsn
        self._size = size
        self._idle: list[Any] = []  # asyncpg.Connection
        self._open = 0  # idle, lent or being opened
        self._waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._closed = False

    @property
    def open(self) -> int:
        return self._open

    async def run(self, job: Callable[[Any], Awaitable[T]]) -> T:
        """``job(connection)`` on a connection of its own while it runs."""
        conn = await self._take()
        try:
            result = await job(conn)
        except (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError):
            # The server refused a row (the intake bisects the batch, a
            # statement each half): the connection is as it was, unless a
            # transaction the job began was left open. Any other error may be
            # the connection's own (an administrator's shutdown, a crash), and
            # a reconnect is cheap next to a batch failed on a dead one.
            if conn.is_in_transaction() or conn.is_closed():
                self._drop(conn)
            else:
                self._give(conn)
            raise
        except BaseException:
            self._drop(conn)
            raise
        self._give(conn)
        return result

    async def _take(self) -> Any:
        while True:
            if self._idle:
                return self._idle.pop()
            if self._open < self._size:
                self._open += 1
                try:
                    return await asyncpg.connect(self._dsn)
                except BaseException:
                    self._open -= 1
                    self._wake(None)
                    raise
            waiter = asyncio.get_running_loop().create_future()
            self._waiting.append(waiter)
            try:
                conn = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    # Handed a connection (or a turn) as it was cancelled: pass it on.
                    handed = waiter.result()
                    if handed is None:
                        self._wake(None)
                    else:
                        self._give(handed)
                else:
                    self._waiting.remove(waiter)
                raise
            if conn is not None:
                return conn
            # None: a connection was closed, so there is room to open one.

    def _give(self, conn: Any) -> None:
        if self._closed:
            self._drop(conn)
        elif not self._wake(conn):
            self._idle.append(conn)

    def _drop(self, conn: Any) -> None:
        self._open -= 1
        conn.terminate()
        self._wake(None)

    def _wake(self, conn: Any) -> bool:
        """Hand ``conn`` (None: a turn to open one) to the first statement waiting, if any."""
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return True
        return False

    async def close(self) -> None:
        """Close the idle connections; one still lent is closed when given back."""
        self._closed = True
        idle, self._idle = self._idle, []
        self._open -= len(idle)
        await asyncio.gather(*(conn.close() for conn in idle), return_exceptions=True)
