"""What a store's callers catch: closed for writes, or the database unavailable."""

from __future__ import annotations

from sqlalchemy import exc as sa_exc


class DatabaseClosed(Exception):
    """The database no longer takes writes (the process is shutting down)."""


# SQLSTATEs of a server that cannot serve now, whatever was asked of it
# (PostgreSQL's error codes, appendix A): class 08, the connection failed or
# was lost; 57P01 admin_shutdown and 57P02 crash_shutdown, the server is going
# down; 57P03 cannot_connect_now, starting up, shutting down or in recovery;
# 53300 too_many_connections.
_UNAVAILABLE_SQLSTATES = ("08", "57P01", "57P02", "57P03", "53300")


def is_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` says the database cannot be reached or cannot serve
    now (down, restarting, recovering, refusing connections, the pool out of
    connections), so that a caller answers "unavailable, retry" rather than
    "bug". An integrity or syntax error is not: that is the statement's fault.

    The drivers' exceptions arrive wrapped (SQLAlchemy's DBAPIError around the
    driver's, or around an adapter's around the driver's), so the whole chain
    of causes is read.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, sa_exc.TimeoutError | OSError):
            return True  # the pool had no connection to give; refused, reset, timed out
        if isinstance(current, sa_exc.DBAPIError) and (
            current.connection_invalidated
            or isinstance(current, sa_exc.OperationalError | sa_exc.InterfaceError)
        ):
            return True
        sqlstate = getattr(current, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate.startswith(_UNAVAILABLE_SQLSTATES):
            return True
        orig = getattr(current, "orig", None)
        current = orig if isinstance(orig, BaseException) else current.__cause__
    return False
