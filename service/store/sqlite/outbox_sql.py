"""The outbox's hot statements on SQLite, on the driver: the intake's one
INSERT for documents and events together, new rows, the claim and the
delivered mark. Each is one statement of one step however many rows it
carries (see connection.json_rows): on the writer thread every step gives up
the GIL and takes it back from the busy event loop."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import orjson

from ..contract import (
    Accepted,
    Claim,
    ClaimedEvent,
    HandOff,
    IntakeError,
    NewEvent,
    OutboxStatus,
    Relayed,
    RelayRequest,
    Submission,
    lease_values,
)
from ..database import PendingSubmission, Written
from .connection import insert_json_rows_sql, json_rows, sqlite_time

# The states as SQL literals: the enum's values, never retyped.
PENDING, SENDING, DELIVERED = (
    f"'{s.value}'" for s in (OutboxStatus.PENDING, OutboxStatus.SENDING, OutboxStatus.DELIVERED)
)


# The columns of a batch's lease, in lease_params's order.
_LEASE_COLUMNS = ("status", "lease_owner", "lease_token", "lease_expires_at")


def lease_params(hand_off: HandOff | None) -> tuple[str | None, ...]:
    """lease_values as SQLite stores them (the expiry as sqlite_time)."""
    status, owner, token, expires_at = lease_values(hand_off)
    return status, owner, token, None if expires_at is None else sqlite_time(expires_at)


def enqueue_from(source: str, first: int, lease: Sequence[str], *, origin: bool = False) -> str:
    """The INSERT of new rows from the JSON arrays of ``json_each(source)``. From
    element ``first`` on, each array holds the event's id, created_at (as
    sqlite_time), name and payload, then its origin when ``origin``; ``lease``
    gives the SQL of the rows' status, lease_owner, lease_token and
    lease_expires_at (see lease_params)."""

    def element(i: int) -> str:
        return f"json_extract(value, '$[{first + i}]')"

    status, owner, token, expires_at = lease
    return (
        "INSERT INTO outbox (id, created_at, available_at, event_name, payload,"
        f"{' origin,' if origin else ''} status, attempts, lease_owner, lease_token,"
        f" lease_expires_at) SELECT {element(0)}, {element(1)}, {element(1)}, {element(2)},"
        f" {element(3)},{f' {element(4)},' if origin else ''} {status}, 0, {owner}, {token},"
        f" {expires_at} FROM json_each({source})"
    )


_ENQUEUE = insert_json_rows_sql(
    "outbox",
    ("id", "event_name", "payload", "available_at", "created_at"),
    {
        "status": "?",
        "attempts": "0",
        "lease_owner": "?",
        "lease_token": "?",
        "lease_expires_at": "?",
    },
)


def enqueue(raw: sqlite3.Connection, events: Sequence[NewEvent], hand_off: HandOff | None) -> None:
    """New rows in the caller's transaction, the timestamps in SQLAlchemy's own text."""
    if events:
        rows = json_rows(
            (e.id, e.name, e.payload, t := sqlite_time(e.created_at), t) for e in events
        )
        raw.execute(_ENQUEUE, (*lease_params(hand_off), rows))


class _BatchRows:
    """A batch's rows for the writer (writer.Rows): each request's encoded
    here, on the event loop, as the batch goes (``_encode``); taken, less the
    requests cancelled meanwhile, on the writer thread when its transaction
    runs, or as they are handed to the rows process."""

    __slots__ = ("_batch", "_texts", "_kept", "check", "params")
    sql: str
    setup: tuple[str, ...]

    def __init__(
        self,
        batch: Sequence[PendingSubmission],
        hand_off: HandOff | None,
        check: Callable[[], None] | None,
    ) -> None:
        self.params = lease_params(hand_off)
        self._batch = batch
        self._texts = [self._encode(p.submission) for p in batch]
        self._kept: list[bool] = []
        self.check = check

    @staticmethod
    def _encode(request: Any) -> str:
        """The request's rows: JSON arrays joined by commas, no brackets."""
        raise NotImplementedError

    def take(self) -> list[str]:
        self._kept = [not p.future.cancelled() for p in self._batch]
        return [text for text, kept in zip(self._texts, self._kept, strict=True) if kept and text]

    def _kept_requests(self) -> list[Any]:
        return [p.submission for p, kept in zip(self._batch, self._kept, strict=True) if kept]


def _found(raw: sqlite3.Connection, ids: Sequence[str]) -> int:
    """How many of ``ids`` the outbox holds."""
    (found,) = raw.execute(
        "SELECT count(*) FROM outbox WHERE id IN (SELECT value FROM json_each(?))",
        (orjson.dumps(list(ids)).decode(),),
    ).fetchone()
    return int(found)


# -- relayed events --------------------------------------------------------------------

# A row: [id, created_at, event_name, payload, origin].

# The relay's hot path, RelayedRows: a batch's events and their keys' last use
# by ONE statement into a view whose trigger writes both, as the intake's rows
# are (below). An id already in the outbox fails the statement whole (its
# primary key): nothing of the batch is kept, and the batch is written again
# by insert_relayed, which skips such ids. Retries and ids sent twice are rare;
# the statement that need not name what it wrote is the one that merges.
RELAYED_SETUP = (
    f"CREATE TEMP VIEW IF NOT EXISTS relay_rows (rows, {', '.join(_LEASE_COLUMNS)})"
    " AS SELECT NULL, NULL, NULL, NULL, NULL",
    "CREATE TEMP TRIGGER IF NOT EXISTS relay_rows_insert"
    " INSTEAD OF INSERT ON relay_rows BEGIN "
    + enqueue_from("NEW.rows", first=0, lease=[f"NEW.{c}" for c in _LEASE_COLUMNS], origin=True)
    + "; UPDATE relay_keys SET last_used_at = max(coalesce(last_used_at, ''),"
    " (SELECT max(json_extract(value, '$[1]')) FROM json_each(NEW.rows)"
    "  WHERE json_extract(value, '$[4]') = relay_keys.name))"
    " WHERE name IN (SELECT json_extract(value, '$[4]') FROM json_each(NEW.rows)); END",
)
RELAYED_INSERT = (
    f"INSERT INTO relay_rows (rows, {', '.join(_LEASE_COLUMNS)}) VALUES (?, ?, ?, ?, ?)"
)


class RelayedRows(_BatchRows):
    """A batch of relay requests' events (see _BatchRows)."""

    __slots__ = ()
    sql = RELAYED_INSERT
    setup = RELAYED_SETUP

    @staticmethod
    def _encode(request: RelayRequest) -> str:
        return _relayed_text(request)

    def committed(self, raw: sqlite3.Connection) -> bool:
        ids = {e.id for r in self._kept_requests() for e in r.events}
        # One statement wrote them all or none, and it fails if any was there.
        return bool(ids) and _found(raw, sorted(ids)) == len(ids)

    def written(self) -> Written:
        results: list[Relayed | None] = []
        for pending, kept in zip(self._batch, self._kept, strict=True):
            events = pending.submission.events  # type: ignore[attr-defined]
            results.append(Relayed(len(events)) if kept else None)
        return results, [e for r in self._kept_requests() for e in r.events]


def _relayed_text(request: RelayRequest) -> str:
    """The request's rows as JSON arrays joined by commas (one text, no brackets)."""
    origin = request.origin
    rows = []
    created = text = None
    for e in request.events:
        # A request's events share their time of receipt: written once, not
        # once an event (sqlite_time is most of the cost of a row here).
        if e.created_at is not created:
            created, text = e.created_at, sqlite_time(e.created_at)
        rows.append((e.id, text, e.name, e.payload, origin))
    return orjson.dumps(rows).decode()[1:-1]


# ON CONFLICT DO NOTHING leaves an id already in the outbox as it is (and the
# second of an id met twice in the rows); RETURNING names the rows written.
# (WHERE true: without it, SQLite would read ON CONFLICT as the SELECT's join
# constraint.)
_RELAYED = (
    "INSERT INTO outbox (id, created_at, available_at, event_name, payload, origin, status,"
    " attempts, lease_owner, lease_token, lease_expires_at)"
    " SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'),"
    " json_extract(value, '$[1]'), json_extract(value, '$[2]'), json_extract(value, '$[3]'),"
    " json_extract(value, '$[4]'), ?, 0, ?, ?, ? FROM json_each(?) WHERE true"
    " ON CONFLICT (id) DO NOTHING RETURNING id"
)


def insert_relayed(
    raw: sqlite3.Connection, rows: Sequence[tuple[NewEvent, str]], hand_off: HandOff | None
) -> set[str]:
    """New rows with their origins, in the caller's transaction, skipping ids
    already in the outbox; the ids written."""
    text = json_rows(
        (e.id, sqlite_time(e.created_at), e.name, e.payload, origin) for e, origin in rows
    )
    return {row[0] for row in raw.execute(_RELAYED, (*lease_params(hand_off), text))}


# -- the intake's one statement ------------------------------------------------------

# Both rows of every submission of the batches waiting for the writer by ONE
# statement, an INSERT into a view whose trigger writes the documents and their
# outbox rows. One statement is one step of the driver, so one wait for the GIL
# on the writer thread, and is atomic by itself: a document is never kept
# without its event. TEMP objects live on the writer's connection only; the
# schema knows nothing of them.
# A row: [user_id, document_name, event_id, created_at, event_name, payload].
# The lease (lease_params) is the batch's, a parameter of its own: the rows'
# JSON is parsed again for every value taken from it, and the lease is four of
# a row's ten values.
SUBMISSIONS_SETUP = (
    f"CREATE TEMP VIEW IF NOT EXISTS intake_rows (rows, {', '.join(_LEASE_COLUMNS)})"
    " AS SELECT NULL, NULL, NULL, NULL, NULL",
    "CREATE TEMP TRIGGER IF NOT EXISTS intake_rows_insert"
    " INSTEAD OF INSERT ON intake_rows BEGIN"
    " INSERT INTO documents (user_id, document_name, event_id, created_at)"
    " SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'),"
    " json_extract(value, '$[2]'), json_extract(value, '$[3]')"
    " FROM json_each(NEW.rows); "
    + enqueue_from("NEW.rows", first=2, lease=[f"NEW.{c}" for c in _LEASE_COLUMNS])
    + "; END",
)
SUBMISSIONS_INSERT = (
    f"INSERT INTO intake_rows (rows, {', '.join(_LEASE_COLUMNS)}) VALUES (?, ?, ?, ?, ?)"
)


class SubmissionRows(_BatchRows):
    """A batch of documents with their events (see _BatchRows)."""

    __slots__ = ()
    sql = SUBMISSIONS_INSERT
    setup = SUBMISSIONS_SETUP

    @staticmethod
    def _encode(submission: Submission) -> str:
        e = submission.event
        return orjson.dumps(
            (
                submission.user_id,
                submission.document_name,
                e.id,
                sqlite_time(e.created_at),
                e.name,
                e.payload,
            )
        ).decode()

    def committed(self, raw: sqlite3.Connection) -> bool:
        ids = [s.event.id for s in self._kept_requests()]
        return _found(raw, ids) > 0  # one statement wrote them all, or none

    def written(self) -> Written:
        results: list[Accepted | IntakeError | None] = []
        fresh: list[NewEvent] = []
        for pending, kept in zip(self._batch, self._kept, strict=True):
            if kept:
                results.append(Accepted(pending.submission.event.id))
                fresh.append(pending.submission.event)
            else:
                results.append(None)
        return results, fresh


# -- the claim -------------------------------------------------------------------------

# SQLite has no row locks; the writer thread serialises claims. Three
# statements: expired leases first, then due rows, each oldest first; the
# lease; the leased rows as one text.
_CLAIMABLE = (
    "SELECT json_group_array(id) FROM ("
    f" SELECT id FROM (SELECT id FROM outbox WHERE status = {SENDING}"
    "  AND lease_expires_at <= :now ORDER BY lease_expires_at LIMIT :limit)"
    " UNION ALL"
    f" SELECT id FROM (SELECT id FROM outbox WHERE status = {PENDING}"
    "  AND available_at <= :now ORDER BY available_at LIMIT :limit)"
    " LIMIT :limit)"
)
_LEASE = (
    f"UPDATE outbox SET status = {SENDING}, lease_owner = ?, lease_token = ?,"
    " lease_expires_at = ? WHERE id IN (SELECT value FROM json_each(?))"
)
# The leased rows as one text: the fields of a row joined by U+001F, the rows by
# U+001E, the payload last. JSON text never holds a raw control character, so
# neither separator can occur in a payload, and no payload is escaped into JSON
# and parsed back (which would cost a third of the drain's time). Either of the
# last outcome's columns set means an earlier outcome (a timeout or a dropped
# connection has an error and no status code).
_LEASED = (
    "SELECT group_concat(id || char(31) || attempts || char(31)"
    " || (last_status_code IS NOT NULL OR last_error IS NOT NULL) || char(31) || payload,"
    " char(30)) FROM outbox WHERE id IN (SELECT value FROM json_each(?)) AND lease_token = ?"
)


def claim(
    raw: sqlite3.Connection,
    token: str,
    owner: str,
    limit: int,
    now: datetime,
    expires_at: datetime,
) -> Claim:
    (ids_json,) = raw.execute(_CLAIMABLE, {"now": sqlite_time(now), "limit": limit}).fetchone()
    if ids_json == "[]":
        return Claim(token, owner, [])
    raw.execute(_LEASE, (owner, token, sqlite_time(expires_at), ids_json))
    (rows,) = raw.execute(_LEASED, (ids_json, token)).fetchone()
    by_id = {}
    for row in rows.split("\x1e") if rows else ():
        event_id, attempts, seen, payload = row.split("\x1f", 3)
        by_id[event_id] = ClaimedEvent(event_id, payload, int(attempts), seen == "1")
    # Oldest first, as claimed.
    return Claim(token, owner, [by_id[i] for i in orjson.loads(ids_json) if i in by_id])


# -- the delivered mark ---------------------------------------------------------------

_DELIVERED = (
    f"UPDATE outbox SET status = {DELIVERED}, attempts = attempts + 1, delivered_at = ?,"
    " last_status_code = 200, lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL"
    f" WHERE lease_token = ? AND status = {SENDING} AND id IN (SELECT value FROM json_each(?))"
)


def delivered(values: dict[str, Any]) -> tuple[str, tuple[Any, ...]]:
    """The delivered mark's driver statement for the values of outbox's Core one."""
    ids = orjson.dumps(list(values["ids"])).decode()
    return _DELIVERED, (sqlite_time(values["now"]), values["token"], ids)
