"""The hot path's asyncpg connections: each kept open between statements (its
prepared statements live on it) and lent to one statement at a time.

asyncpg's Pool would do the lending, but its release runs in a task of its own
(asyncio.shield) and awaits a reset: under load every such step waits a turn
of a busy event loop, and the requests of a group commit wait with it. Here a
statement that ends gives its connection back at once, without an await.

A connection is lent again only if its statement ended well, or with a row the
server refused (SQLSTATE classes 22 and 23: the intake bisects such a batch, a
statement each half), and no transaction is left open on it. After any other
error (the connection lost, cancelled, an administrator's shutdown) it is
closed, since a reconnect is cheap next to a batch failed on a dead one. An
idle connection found closed (a server restart), or idle longer than asyncpg's
Pool would keep it, is closed instead of lent.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

from ..errors import DatabaseClosed

T = TypeVar("T")

# asyncpg's Pool default (max_inactive_connection_lifetime): a connection a
# firewall dropped while idle is not trusted with a statement.
MAX_IDLE_SECONDS = 300.0
CLOSE_TIMEOUT_SECONDS = 5.0


class HotConnections:
    """Up to ``size`` connections to ``dsn``, opened when first needed."""

    def __init__(self, dsn: str, size: int) -> None:
        self._dsn = dsn
        self._size = size
        self._idle: list[tuple[Any, float]] = []  # (asyncpg.Connection, idle since)
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
            self._give(conn)
            raise
        except BaseException:
            self._drop(conn)
            raise
        self._give(conn)
        return result

    async def _take(self) -> Any:
        loop = asyncio.get_running_loop()
        while True:
            if self._closed:
                raise DatabaseClosed()
            if self._idle:
                conn, since = self._idle.pop()
                if conn.is_closed() or loop.time() - since > MAX_IDLE_SECONDS:
                    self._drop(conn)
                    continue
                return conn
            if self._open < self._size:
                self._open += 1
                try:
                    return await asyncpg.connect(self._dsn)
                except BaseException:
                    self._open -= 1
                    self._wake(None)
                    raise
            waiter = loop.create_future()
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
        if self._closed or conn.is_closed() or conn.is_in_transaction():
            # A transaction left open would hold the next statement's rows
            # uncommitted after it answered.
            self._drop(conn)
        elif not self._wake(conn):
            self._idle.append((conn, asyncio.get_running_loop().time()))

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
        """Close the idle connections; one still lent is closed when given back,
        and a statement still waiting for one is refused."""
        self._closed = True
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_exception(DatabaseClosed())
        idle, self._idle = self._idle, []
        self._open -= len(idle)
        await asyncio.gather(
            *(conn.close(timeout=CLOSE_TIMEOUT_SECONDS) for conn, _ in idle),
            return_exceptions=True,
        )
