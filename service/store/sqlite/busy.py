"""Waiting for SQLite's write lock while another connection holds it: the
writer thread, the rows process and the checkpointer all poll this way.
The standard library only: the rows process imports it."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def while_busy(attempt: Callable[[], T], timeout: float) -> T:
    """``attempt()``, tried again every 0.1 to 1 ms while another connection
    holds SQLite's write lock, for ``timeout`` seconds.

    SQLite's own busy handler sleeps 1, 2, 5, 10, 15, 20, 25 ms and more between
    tries, while the other process's transactions last a millisecond or two: two
    processes writing at once made each other wait tens of milliseconds (the
    API's p99 went to 260 ms beside a worker process)."""
    deadline = time.monotonic() + timeout
    pause = 0.0001
    while True:
        try:
            return attempt()
        except sqlite3.OperationalError as exc:
            if not is_busy(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(pause)  # without the GIL
        pause = min(pause * 2, 0.001)


def is_busy(exc: BaseException) -> bool:
    return getattr(exc, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_BUSY
