"""The SQLite intake's rows, written by a process of their own.

On the writer thread every statement gives up the GIL and takes it back from
the busy event loop, two or three times a transaction, and each take stalls
the loop while the writer runs: the loop thread waited for the GIL a tenth of
the time under load. A process has a GIL of its own. The loop hands it each
batch's rows (writer.Rows) down a pipe and hears back once they are committed
(synchronous=FULL, as on the thread): only then does the intake answer.
bench.compare, 30 rounds: 1.114 times the thread's req/s, faster in 24.

Everything else (jobs, statements, relayed events, Rows with a test hook)
stays on the writer thread; the two take turns at SQLite's write lock, each polling while the
other holds it. If the process dies, each write in its hands was committed
whole or not at all (one statement): the thread answers the committed ones
and writes the others (database.Database._recover_rows), and takes the rows from then on.

Frames both ways: a 4-byte little-endian length, then JSON. To the process:
[seq, sql, setup, params], the rows' JSON text the first of params. Back:
a list of [seq, error], error null or [kind, message]; [[0, null]] once the
database is open.

The process is rows_child.py (it imports next to nothing: it starts with
every app).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from .framing import LENGTH, frames

if TYPE_CHECKING:
    from .writer import Done, Rows

log = logging.getLogger(__name__)

START_TIMEOUT_SECONDS = 30.0
CLOSE_TIMEOUT_SECONDS = 30.0
_CHILD_ENV = frozenset({"PATH", "PYTHONPATH", "LANG", "LC_ALL", "TMPDIR"})


class RowsProcess:
    """The parent's side: submit() on the event loop, done() called there too."""

    def __init__(
        self,
        path: str,
        *,
        busy_timeout_ms: int,
        journal_size_limit: int,
        checkpoint_seconds: float,
        on_lost: Callable[[list[tuple[Rows, Done]]], None] | None = None,
    ) -> None:
        """``on_lost``: given the writes in the process's hands if it dies (they
        may have been committed); without it, they fail."""
        self._args = [path, str(busy_timeout_ms), str(journal_size_limit), str(checkpoint_seconds)]
        self._on_lost = on_lost
        self._transport: asyncio.SubprocessTransport | None = None
        self._out: asyncio.WriteTransport | None = None
        self._pending: dict[int, tuple[Rows, Done]] = {}
        self._seq = itertools.count(1)
        self._ready: asyncio.Future[None] | None = None
        self._output_closed: asyncio.Future[None] | None = None  # its last reply read
        self._exited: asyncio.Future[None] | None = None
        self._closing = False
        self.running = False

    async def start(self) -> None:
        """Start the process; raises if it cannot open the database."""
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._output_closed = loop.create_future()
        self._exited = loop.create_future()
        transport, _ = await loop.subprocess_exec(
            lambda: _Pipes(self),
            sys.executable,
            "-P",  # nothing from the working directory
            "-m",
            "service.store.sqlite.rows_child",
            *self._args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            # None of the service's secrets: it needs none.
            env={k: v for k, v in os.environ.items() if k in _CHILD_ENV},
        )
        self._transport = transport
        self._out = transport.get_pipe_transport(0)  # type: ignore[assignment]
        try:
            async with asyncio.timeout(START_TIMEOUT_SECONDS):
                await asyncio.shield(self._ready)
            if self._output_closed.done():  # it died right after saying it was ready
                raise RuntimeError("the SQLite rows process failed to start")
        except BaseException:
            await self.close()
            raise
        self.running = True

    def submit(self, rows: Rows, done: Done) -> None:
        """Send ``rows`` (writer.Rows) to be written; ``done(rows.written(), None)`` or
        ``done(None, error)`` once the process has committed them or failed."""
        assert self._out is not None
        texts = rows.take()
        seq = next(self._seq)
        # The setup with every write: the process runs it until it has worked once.
        body = orjson.dumps(
            [seq, rows.sql, rows.setup, ["[" + ",".join(texts) + "]", *rows.params]]
        )
        frame = LENGTH.pack(len(body)) + body
        self._pending[seq] = (rows, done)
        self._out.write(frame)

    async def close(self) -> None:
        """Let the process finish what it was sent, then end it."""
        self._closing = True
        self.running = False
        if self._out is not None:
            self._out.close()  # the process ends at the end of its input
        if self._output_closed is not None and self._exited is not None:
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
                    await asyncio.shield(asyncio.gather(self._output_closed, self._exited))
            except TimeoutError:
                log.error("the SQLite rows process did not end; killing it")
                if self._transport is not None:
                    self._transport.kill()
        if self._transport is not None:
            self._transport.close()
        self._fail_pending("the SQLite rows process was closed")

    def _received(self, frame: bytes) -> None:
        try:
            replies = orjson.loads(frame)
            for seq, error in replies:
                if seq == 0:
                    if self._ready is not None and not self._ready.done():
                        self._ready.set_result(None)
                elif error is None:
                    self._settle(*self._pending.pop(seq))
                else:
                    _, done = self._pending.pop(seq)
                    _call(done, None, _error(*error))
        except Exception:
            # Not what it sends: it cannot be trusted with more. Its death
            # hands what it had to the thread (_lost).
            log.exception("the SQLite rows process answered nonsense; ending it")
            if self._transport is not None:
                self._transport.kill()

    @staticmethod
    def _settle(rows: Rows, done: Done) -> None:
        try:
            result = rows.written()
        except Exception as exc:
            _call(done, None, exc)
        else:
            _call(done, result, None)

    def _exited_now(self) -> None:
        if self._exited is not None and not self._exited.done():
            self._exited.set_result(None)

    def _lost(self) -> None:
        was_running, self.running = self.running, False
        if self._output_closed is not None and not self._output_closed.done():
            self._output_closed.set_result(None)
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(RuntimeError("the SQLite rows process failed to start"))
        if was_running and not self._closing:
            log.critical(
                "the SQLite rows process ended with %d writes in its hands; the writer"
                " thread takes the rows from now on",
                len(self._pending),
            )
            if self._on_lost is not None:
                stranded, self._pending = list(self._pending.values()), {}
                try:
                    self._on_lost(stranded)
                except Exception as exc:
                    for _, done in stranded:
                        _call(done, None, exc)
        self._fail_pending("the SQLite rows process ended")

    def _fail_pending(self, why: str) -> None:
        pending, self._pending = self._pending, {}
        for _, done in pending.values():
            _call(done, None, sqlite3.OperationalError(why))


def _call(done: Done, result: Any, error: BaseException | None) -> None:
    try:
        done(result, error)
    except Exception:
        log.exception("settling the rows process's outcome failed")


class _Pipes(asyncio.SubprocessProtocol):
    def __init__(self, owner: RowsProcess) -> None:
        self._owner = owner
        self._buffer = bytearray()

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        self._buffer += data
        for frame in frames(self._buffer):
            self._owner._received(frame)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if fd == 1:  # its output: nothing more will be answered
            self._owner._lost()

    def process_exited(self) -> None:
        # Not the end of its replies: its output may still hold some (see
        # pipe_connection_lost, which comes after the last of them).
        self._owner._exited_now()


def _error(kind: str, message: str) -> sqlite3.Error:
    if kind == "integrity":
        return sqlite3.IntegrityError(message)
    return sqlite3.OperationalError(message)
