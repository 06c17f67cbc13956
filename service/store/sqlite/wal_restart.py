"""The WAL started again from its beginning by the writers themselves. The
standard library only: the rows process imports it.

The checkpointer thread (writer.py) copies the WAL into the database file and,
past the limit, tries a RESTART checkpoint, which needs the write lock. Under
steady writes the writers hold that lock nearly all the time, and an attempt
from outside, without a busy handler, finds it taken again and again: the WAL
grows for as long as the load lasts. A writer, just after its commit and its
answers, holds no lock: there it checks the WAL's size and, past the limit,
runs the RESTART itself. Its next write then starts the WAL again, and
journal_size_limit trims the file.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time

log = logging.getLogger(__name__)


class WalRestarts:
    """A writer's RESTART checkpoints of ``path``'s WAL past ``limit`` bytes, at
    most one every ``interval`` seconds: a reader still using the WAL makes a
    RESTART fail after it has copied the WAL and synced the database file,
    and that must not follow every commit."""

    def __init__(self, path: str, limit: int, interval: float) -> None:
        # SQLite keeps the WAL next to the file a symbolic link names.
        self._wal = f"{os.path.realpath(path)}-wal"
        self._limit = limit
        self._interval = interval
        self._next = 0.0

    def after_commit(self, conn: sqlite3.Connection) -> None:
        """On the writer's connection (busy_timeout 0, no transaction open)."""
        now = time.monotonic()
        if now < self._next:
            return
        # Looked at once an interval, not every commit: a stat gives up the
        # GIL, and the writer thread would wait to take it back.
        self._next = now + self._interval
        try:
            if os.stat(self._wal).st_size <= self._limit:
                return
        except OSError:  # no WAL file (not in WAL mode), or unreadable: nothing to do
            return
        try:
            # A lock taken or a reader in the WAL answers busy in the row, not
            # as an error: the next attempt comes after the interval.
            conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
        except sqlite3.Error as exc:
            log.warning("WAL restart failed: %s", exc)
