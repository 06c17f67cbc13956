"""Storage: everything that knows which database it is on.

``database.Database`` is the boundary the rest of the service speaks to: it is
chosen once, from the URL, and carries the backend's machinery. ``sqlite/``
holds SQLite's (connection rules, the writer thread, the rows process, the
checkpointer); ``postgres/`` holds PostgreSQL's (NOTIFY and the LISTEN
listener). Nothing here is imported by this file: the SQLite rows process
starts from ``sqlite/rows_child.py`` and must import next to nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .database import Database


def open_database(url: str, **kwargs: Any) -> Database:
    """The store for ``url``'s backend (not started: ``async with`` it, or
    ``start()``). The backend is chosen here, once."""
    if url.startswith("sqlite"):
        from .sqlite.database import SQLiteDatabase

        return SQLiteDatabase(url, **kwargs)
    if url.startswith("postgresql"):
        from .postgres.database import PostgresDatabase

        return PostgresDatabase(url, **kwargs)
    raise ValueError("DATABASE_URL must be a sqlite+aiosqlite:// or postgresql+asyncpg:// URL")
