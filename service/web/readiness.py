"""The schema revision /readyz compares with the code's, read cheaply."""

from __future__ import annotations

import asyncio
import math
import time

import sqlalchemy as sa

from ..store.database import Database

# How long one look at the schema's revision answers every /readyz.
REVISION_CACHE_SECONDS = 1.0


class RevisionCheck:
    """The database's schema revision, read at most once a REVISION_CACHE_SECONDS
    however often /readyz is called: one query for every caller in that time.

    A failed read is not kept: the next caller asks again (one query at a time,
    whoever waits shares it), so a database back from an outage shows at once.
    """

    def __init__(self, *, cache_seconds: float = REVISION_CACHE_SECONDS) -> None:
        self._cache_seconds = cache_seconds
        self._read_at = -math.inf
        self._answer: tuple[str | None, str | None] = (None, None)
        self._reading: asyncio.Future[tuple[str | None, str | None]] | None = None

    async def read(self, db: Database) -> tuple[str | None, str | None]:
        """(revision, None), or (None, the error's name) when the query failed."""
        if time.monotonic() - self._read_at < self._cache_seconds:
            return self._answer
        if self._reading is None:
            # A task of its own: a caller that goes away does not fail the others.
            self._reading = asyncio.ensure_future(self._query(db))
            self._reading.add_done_callback(self._done)
        return await asyncio.shield(self._reading)

    def _done(self, reading: asyncio.Future[tuple[str | None, str | None]]) -> None:
        self._reading = None
        if not reading.cancelled() and reading.exception() is None:
            self._answer = reading.result()
            self._read_at = time.monotonic() if self._answer[1] is None else -math.inf

    @staticmethod
    async def _query(db: Database) -> tuple[str | None, str | None]:
        try:
            async with db.engine.connect() as conn:
                return await conn.scalar(sa.text("SELECT version_num FROM alembic_version")), None
        except Exception as exc:  # what failed matters here, not the traceback
            return None, type(exc).__name__
