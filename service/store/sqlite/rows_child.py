"""The SQLite rows process's own code (see rows_process.py): it reads
writes from its input, commits them and answers on its output.

    python -m service.store.sqlite.rows_child PATH BUSY_TIMEOUT_MS JOURNAL_SIZE_LIMIT \
        CHECKPOINT_SECONDS

Only the standard library and orjson: it starts with every app.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import sys
from typing import Any

import orjson

from service.store.sqlite.busy import while_busy
from service.store.sqlite.framing import LENGTH, frames
from service.store.sqlite.wal_restart import WalRestarts


def main(argv: list[str]) -> None:
    path, busy_timeout_ms, journal_size_limit = argv[0], int(argv[1]), int(argv[2])
    restarts = WalRestarts(path, journal_size_limit, float(argv[3]))
    # It ends when its input does, once what it was sent is written: a Ctrl-C
    # or SIGTERM meant for the service must not cut its writes short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Its answers go to a descriptor of their own; fd 1 becomes stderr, so that
    # nothing a library prints can garble them.
    answers = os.dup(1)
    os.dup2(2, 1)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")  # committed means on disk
    conn.execute("PRAGMA busy_timeout=0")  # polled by while_busy instead
    conn.execute(f"PRAGMA journal_size_limit={journal_size_limit}")
    conn.execute("PRAGMA foreign_keys=ON")
    # Checkpoints are the service's checkpointer thread's (writer.py):
    # here they would come before an answer, with an fsync of the database.
    conn.execute("PRAGMA wal_autocheckpoint=0")
    _reply(answers, [[0, None]])
    set_up: set[str] = set()  # the SQL whose setup has worked
    buffer = bytearray()
    while chunk := os.read(0, 1 << 20):
        buffer += chunk
        writes = [orjson.loads(frame) for frame in frames(buffer)]
        if writes:
            _reply(answers, _write(conn, writes, busy_timeout_ms / 1000, set_up))
            restarts.after_commit(conn)  # once the answers are out
    conn.close()


def _reply(fd: int, replies: list[list[Any]]) -> None:
    body = orjson.dumps(replies)
    data = memoryview(LENGTH.pack(len(body)) + body)
    while data:
        data = data[os.write(fd, data) :]


def _write(
    conn: sqlite3.Connection,
    writes: list[list[Any]],
    busy_timeout: float,
    set_up: set[str],
) -> list[Any]:
    """Every write sent at once: those of the same INSERT and parameters merged
    into one statement, its own transaction; a bad row fails only its write."""
    groups: dict[tuple[Any, ...], list[list[Any]]] = {}
    replies: list[list[Any]] = []
    for write in writes:
        seq, sql, setup, params = write
        if sql not in set_up:
            try:
                for statement in setup:  # CREATE TEMP ... IF NOT EXISTS
                    while_busy(lambda s=statement: conn.execute(s), busy_timeout)
            except sqlite3.Error as exc:
                replies.append([seq, ["error", str(exc)]])
                continue
            set_up.add(sql)
        groups.setdefault((sql, *params[1:]), []).append(write)
    for (sql, *others), group in groups.items():
        replies.extend(_insert(conn, sql, others, group, busy_timeout))
    return replies


def _insert(
    conn: sqlite3.Connection,
    sql: str,
    others: list[Any],
    group: list[list[Any]],
    busy_timeout: float,
) -> list[list[Any]]:
    parts = [write[3][0][1:-1] for write in group]
    rows = "[" + ",".join(part for part in parts if part) + "]"
    try:
        if rows != "[]":
            while_busy(lambda: conn.execute(sql, (rows, *others)), busy_timeout)
    except sqlite3.IntegrityError as exc:
        if len(group) > 1:
            return [r for write in group for r in _insert(conn, sql, others, [write], busy_timeout)]
        return [[group[0][0], ["integrity", str(exc)]]]
    except sqlite3.Error as exc:
        return [[write[0], ["error", str(exc)]] for write in group]
    return [[write[0], None] for write in group]


if __name__ == "__main__":
    main(sys.argv[1:])
