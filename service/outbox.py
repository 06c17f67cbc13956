"""The outbox: its states and the only code that writes outbox rows.

Every change of an outbox row's status goes through this module, so the state
machine can be read in one place.
"""

from __future__ import annotations

import enum
import json
import sqlite3
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from .models import UTCDateTime, outbox, outbox_history
from .store.database import Database
from .store.encoding import RawJSON
from .store.postgres.listener import NOTIFY_SQL
from .store.sqlite.connection import insert_json_rows_sql, json_rows, sqlite_time

# Version of the event's shape (the "v" field Inngest carries for us).
EVENT_SCHEMA_VERSION = "1"
# The newest history entries kept per event: a retry loop, or an event
# replayed again and again, cannot grow the history without end.
HISTORY_LIMIT = 25


class HistoryKind(enum.StrEnum):
    RETRY = "retry"  # a send failed; the row went back to pending for a later attempt
    FAILED = "failed"  # the row went to failed (refused by Inngest, or out of attempts)
    DELIVERED = "delivered"  # delivered after earlier outcomes (a first-try delivery writes none)
    HELD = "held"  # not the row's fault (a refused key, Inngest unavailable): attempts unchanged
    REPLAYED = "replayed"  # an operator put the row back to pending


class OutboxStatus(enum.StrEnum):
    # Written by the API in the same transaction as the business row. The
    # worker claims it when available_at is due; a retry puts it back here.
    PENDING = "pending"
    # Claimed by a worker under a lease (owner, token, expiry), or written so
    # by the API when its own process's worker takes the rows straight from the
    # commit (a hand-off: no claim needed). The worker moves it to delivered,
    # back to pending (retry) or failed; if the worker dies, the expired lease
    # makes the row claimable again.
    SENDING = "sending"
    # Inngest acknowledged it. Terminal; removed only by retention.
    DELIVERED = "delivered"
    # Cannot be delivered (rejected by Inngest, or out of attempts). Terminal
    # until an operator replays it.
    FAILED = "failed"


@dataclass(slots=True)  # one per request: not frozen, which costs per field
class NewEvent:
    """An event about to enter the outbox. ``payload`` is the serialised event."""

    id: str
    name: str
    payload: RawJSON
    created_at: datetime


def build_event(
    *, event_id: str, name: str, data: dict[str, Any], user_id: int, username: str, ts_ms: int
) -> dict[str, Any]:
    """The event exactly as Inngest will receive it (see shared/inngest-event-api.md)."""
    return {
        "id": event_id,
        "name": name,
        "data": data,
        "user": {"id": user_id, "username": username},
        "ts": ts_ms,
        "v": EVENT_SCHEMA_VERSION,
    }


@dataclass(frozen=True, slots=True)
class HandOff:
    """A lease for rows being written: this process's worker takes them from the
    commit, sparing their claim (see OutboxStatus.SENDING)."""

    owner: str
    token: str
    expires_at: datetime


_SQLITE_ENQUEUE = insert_json_rows_sql(
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


def _lease(hand_off: HandOff | None) -> tuple[str, str | None, str | None, datetime | None]:
    """A new row's status, lease_owner, lease_token and lease_expires_at:
    pending, or leased by ``hand_off``."""
    if hand_off is None:
        return OutboxStatus.PENDING.value, None, None, None
    return OutboxStatus.SENDING.value, hand_off.owner, hand_off.token, hand_off.expires_at


def sqlite_lease(hand_off: HandOff | None) -> tuple[str | None, ...]:
    """_lease as SQLite stores it (the expiry as sqlite_time)."""
    status, owner, token, expires_at = _lease(hand_off)
    return status, owner, token, None if expires_at is None else sqlite_time(expires_at)


def sqlite_enqueue_from(source: str, first: int, lease: Sequence[str]) -> str:
    """SQLite: the INSERT of new rows from the JSON arrays of ``json_each(source)``
    (the intake's one statement). From element ``first`` on, each array holds
    the event's id, created_at (as sqlite_time), name and payload; ``lease``
    gives the SQL of the rows' status, lease_owner, lease_token and
    lease_expires_at (see sqlite_lease)."""

    def element(i: int) -> str:
        return f"json_extract(value, '$[{first + i}]')"

    status, owner, token, expires_at = lease
    return (
        "INSERT INTO outbox (id, created_at, available_at, event_name, payload, status,"
        " attempts, lease_owner, lease_token, lease_expires_at)"
        f" SELECT {element(0)}, {element(1)}, {element(1)}, {element(2)}, {element(3)},"
        f" {status}, 0, {owner}, {token}, {expires_at} FROM json_each({source})"
    )


def enqueue(conn: Connection, events: Sequence[NewEvent], hand_off: HandOff | None = None) -> None:
    """Insert new rows in the caller's transaction: pending, or leased by ``hand_off``."""
    if not events:
        return
    raw = conn.connection.driver_connection
    if isinstance(raw, sqlite3.Connection):
        # One statement on the driver for every row (see json_rows), the
        # timestamps in SQLAlchemy's own text format.
        raw.execute(
            _SQLITE_ENQUEUE,
            (
                *sqlite_lease(hand_off),
                json_rows(
                    (e.id, e.name, e.payload, t := sqlite_time(e.created_at), t) for e in events
                ),
            ),
        )
        return
    status, owner, token, expires_at = _lease(hand_off)
    conn.execute(
        outbox.insert(),
        [
            {
                "id": e.id,
                "event_name": e.name,
                "payload": e.payload,
                "status": status,
                "attempts": 0,
                "available_at": e.created_at,
                "created_at": e.created_at,
                "lease_owner": owner,
                "lease_token": token,
                "lease_expires_at": expires_at,
            }
            for e in events
        ],
    )


@dataclass(frozen=True, slots=True)
class ClaimedEvent:
    id: str
    payload: str  # the serialised event, sent as is
    attempts: int  # attempts before this one
    # It has a story (an earlier failed attempt, a replay): its delivery goes
    # into the history too.
    seen: bool = False

    @property
    def size(self) -> int:
        return len(self.payload.encode("utf-8"))


@dataclass(frozen=True, slots=True)
class Claim:
    token: str  # fences every later mark: a stale token marks nothing
    owner: str
    events: list[ClaimedEvent]


# Statements are built once, not per call: building one is a visible cost on the hot path.
_BY_LEASE = sa.and_(
    outbox.c.id.in_(sa.bindparam("ids", expanding=True)),
    outbox.c.lease_token == sa.bindparam("token"),
    outbox.c.status == OutboxStatus.SENDING,
)
_CLEAR_LEASE = {"lease_owner": None, "lease_token": None, "lease_expires_at": None}
_EXPIRED = (
    sa.select(outbox.c.id)
    .where(
        outbox.c.status == OutboxStatus.SENDING,
        outbox.c.lease_expires_at <= sa.bindparam("now", type_=UTCDateTime),
    )
    .order_by(outbox.c.lease_expires_at)
    .limit(sa.bindparam("limit"))
    .with_for_update(skip_locked=True)
)
_DUE = (
    sa.select(outbox.c.id)
    .where(
        outbox.c.status == OutboxStatus.PENDING,
        outbox.c.available_at <= sa.bindparam("now", type_=UTCDateTime),
    )
    .order_by(outbox.c.available_at)
    .limit(sa.bindparam("limit"))
    .with_for_update(skip_locked=True)
)
_LEASE = (
    outbox.update()
    .where(outbox.c.id.in_(sa.bindparam("ids", expanding=True)))
    .values(
        status=OutboxStatus.SENDING,
        lease_owner=sa.bindparam("owner"),
        lease_token=sa.bindparam("token"),
        lease_expires_at=sa.bindparam("expires_at"),
    )
    .returning(
        outbox.c.id,
        sa.cast(outbox.c.payload, sa.Text),
        outbox.c.attempts,
        # The columns, not "IS NOT NULL": SQLite (3.40 here) answers 1 for that
        # expression in a RETURNING clause even where the column is NULL. Either
        # set means an earlier outcome (a timeout or a dropped connection has an
        # error and no status code).
        outbox.c.last_status_code,
        outbox.c.last_error,
    )
)
_DELIVERED = (
    outbox.update()
    .where(_BY_LEASE)
    .values(
        status=OutboxStatus.DELIVERED,
        attempts=outbox.c.attempts + 1,
        delivered_at=sa.bindparam("now"),
        last_status_code=200,
        **_CLEAR_LEASE,
    )
)
_FAILED = (
    outbox.update()
    .where(_BY_LEASE)
    .values(
        status=OutboxStatus.FAILED,
        attempts=outbox.c.attempts + 1,
        last_error=sa.bindparam("error"),
        last_status_code=sa.bindparam("status_code"),
        **_CLEAR_LEASE,
    )
)
_SQLITE_DELIVERED = (
    "UPDATE outbox SET status = 'delivered', attempts = attempts + 1, delivered_at = ?,"
    " last_status_code = 200, lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL"
    " WHERE lease_token = ? AND status = 'sending' AND id IN (SELECT value FROM json_each(?))"
)
_RELEASED = outbox.update().where(_BY_LEASE).values(status=OutboxStatus.PENDING, **_CLEAR_LEASE)
# Back to pending, due at available_at, with what went wrong recorded.
_BACK_TO_PENDING: dict[str, Any] = {
    "status": OutboxStatus.PENDING,
    "available_at": sa.bindparam("available_at"),
    "last_error": sa.bindparam("error"),
    "last_status_code": sa.bindparam("status_code"),
    **_CLEAR_LEASE,
}
_RETRY = (  # an attempt spent
    outbox.update().where(_BY_LEASE).values(attempts=sa.bindparam("attempt"), **_BACK_TO_PENDING)
)
_DEFERRED = outbox.update().where(_BY_LEASE).values(**_BACK_TO_PENDING)  # none spent
_EXHAUSTED = (
    outbox.update()
    .where(_BY_LEASE)
    .values(
        status=OutboxStatus.FAILED,
        attempts=sa.bindparam("attempt"),
        last_error=sa.bindparam("error"),
        last_status_code=sa.bindparam("status_code"),
        **_CLEAR_LEASE,
    )
)


async def claim_batch(
    db: Database, *, owner: str, limit: int, lease_seconds: float, now: datetime
) -> Claim:
    """Lease up to ``limit`` due rows: pending and due, or sending with an expired lease.

    The claim commits before anything is sent, so no transaction or row lock
    is held while a request to Inngest is in flight. On PostgreSQL the rows
    are picked with FOR UPDATE SKIP LOCKED, so concurrent workers never wait
    for, nor take, each other's rows; on SQLite writes are serialised.
    """
    token = str(uuid.uuid4())
    expires_at = now + timedelta(seconds=lease_seconds)

    def claim(conn: Connection) -> Claim:
        raw = conn.connection.driver_connection
        if isinstance(raw, sqlite3.Connection):
            return _claim_sqlite(raw, token, owner, limit, now, expires_at)
        ids = list(conn.scalars(_EXPIRED, {"now": now, "limit": limit}))
        if len(ids) < limit:
            ids.extend(conn.scalars(_DUE, {"now": now, "limit": limit - len(ids)}))
        if not ids:
            return Claim(token, owner, [])
        rows = conn.execute(
            _LEASE, {"ids": ids, "owner": owner, "token": token, "expires_at": expires_at}
        )
        by_id = {
            row[0]: ClaimedEvent(row[0], row[1], row[2], row[3] is not None or row[4] is not None)
            for row in rows
        }
        # Oldest first, as claimed.
        return Claim(token, owner, [by_id[i] for i in ids if i in by_id])

    return await db.write(claim)


# The claim on SQLite, on the driver: what _EXPIRED, _DUE and _LEASE do (SQLite
# has no row locks; the writer thread serialises claims), in three statements
# of one step each, however many rows (see db.json_rows): expired leases first,
# then due rows, each oldest first; the lease; the leased rows as one text.
_SQLITE_CLAIMABLE = (
    "SELECT json_group_array(id) FROM ("
    " SELECT id FROM (SELECT id FROM outbox WHERE status = 'sending'"
    "  AND lease_expires_at <= :now ORDER BY lease_expires_at LIMIT :limit)"
    " UNION ALL"
    " SELECT id FROM (SELECT id FROM outbox WHERE status = 'pending'"
    "  AND available_at <= :now ORDER BY available_at LIMIT :limit)"
    " LIMIT :limit)"
)
_SQLITE_LEASE = (
    "UPDATE outbox SET status = 'sending', lease_owner = ?, lease_token = ?,"
    " lease_expires_at = ? WHERE id IN (SELECT value FROM json_each(?))"
)
# The leased rows as one text: the fields of a row joined by U+001F, the rows by
# U+001E, the payload last. JSON text never holds a raw control character, so
# neither separator can occur in a payload, and no payload is escaped into JSON
# and parsed back (which would cost a third of the drain's time). "IS NOT NULL"
# is sound here, in a SELECT (see _LEASE).
_SQLITE_LEASED = (
    "SELECT group_concat(id || char(31) || attempts || char(31)"
    " || (last_status_code IS NOT NULL OR last_error IS NOT NULL) || char(31) || payload,"
    " char(30)) FROM outbox WHERE id IN (SELECT value FROM json_each(?)) AND lease_token = ?"
)


def _claim_sqlite(
    raw: sqlite3.Connection,
    token: str,
    owner: str,
    limit: int,
    now: datetime,
    expires_at: datetime,
) -> Claim:
    (ids_json,) = raw.execute(
        _SQLITE_CLAIMABLE, {"now": sqlite_time(now), "limit": limit}
    ).fetchone()
    if ids_json == "[]":
        return Claim(token, owner, [])
    raw.execute(_SQLITE_LEASE, (owner, token, sqlite_time(expires_at), ids_json))
    (rows,) = raw.execute(_SQLITE_LEASED, (ids_json, token)).fetchone()
    by_id = {}
    for row in rows.split("\x1e") if rows else ():
        event_id, attempts, seen, payload = row.split("\x1f", 3)
        by_id[event_id] = ClaimedEvent(event_id, payload, int(attempts), seen == "1")
    # Oldest first, as claimed.
    return Claim(token, owner, [by_id[i] for i in orjson.loads(ids_json) if i in by_id])


# A history entry for a row, written only while the caller's lease still holds it
# (so a late answer records nothing, as it marks nothing). PostgreSQL needs the
# parameters' types spelled out in a SELECT list; SQLite must not get a CAST,
# which would turn its timestamp text into a number.
def _history_if_leased(dialect: str) -> sa.Insert:
    def typed(name: str, type_: Any) -> sa.ColumnElement[Any]:
        param = sa.bindparam(name, type_=type_)
        return sa.cast(param, type_) if dialect == "postgresql" else param

    return outbox_history.insert().from_select(
        ["event_id", "at", "kind", "attempt", "status_code", "error", "actor"],
        sa.select(
            outbox.c.id,
            typed("at", UTCDateTime()),
            typed("kind", sa.String(16)),
            typed("attempt", sa.Integer()),
            typed("status_code", sa.Integer()),
            typed("error", sa.Text()),
            typed("actor", sa.String(255)),
        ).where(
            outbox.c.id == sa.bindparam("event_id"),
            outbox.c.lease_token == sa.bindparam("token"),
            outbox.c.status == OutboxStatus.SENDING,
        ),
    )


_HISTORY_IF_LEASED = {d: _history_if_leased(d) for d in ("sqlite", "postgresql")}
_newer = outbox_history.alias("newer")
_PRUNE_HISTORY = outbox_history.delete().where(
    outbox_history.c.event_id.in_(sa.bindparam("ids", expanding=True)),
    outbox_history.c.id
    < (
        sa.select(_newer.c.id)
        .where(_newer.c.event_id == outbox_history.c.event_id)
        .order_by(_newer.c.id.desc())
        .limit(1)
        .offset(HISTORY_LIMIT - 1)
        .scalar_subquery()
    ),
)


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """What to write into the history for rows a mark moves (None: nothing)."""

    kind: HistoryKind
    actor: str  # the worker's id
    at: datetime
    status_code: int | None = None
    error: str | None = None


def _record_history(
    conn: Connection, token: str, attempts: dict[str, int | None], outcome: HistoryEntry
) -> None:
    """Call before the mark's own update, while the rows are still leased."""
    if not attempts:
        return
    conn.execute(
        _HISTORY_IF_LEASED[conn.dialect.name],
        [
            {
                "event_id": event_id,
                "token": token,
                "at": outcome.at,
                "kind": outcome.kind.value,
                "attempt": attempt,
                "status_code": outcome.status_code,
                "error": outcome.error,
                "actor": outcome.actor,
            }
            for event_id, attempt in attempts.items()
        ],
    )
    conn.execute(_PRUNE_HISTORY, {"ids": list(attempts)})


async def _update_leased(
    db: Database,
    statement: sa.Update,
    ids: Sequence[str],
    token: str,
    history: tuple[dict[str, int | None], HistoryEntry] | None = None,
    *,
    on_sqlite: tuple[str, tuple[Any, ...]] | None = None,
    **params: Any,
) -> int:
    """Run ``statement`` on the rows this lease still holds; how many it held.

    ``on_sqlite``: the same update as driver SQL and its parameters, run instead
    of ``statement`` on SQLite (for the marks on every event's path).
    """
    if not ids:
        return 0
    if on_sqlite is not None and history is None and db.dialect == "sqlite":
        # One statement on the driver, without SQLAlchemy's transaction.
        return await db.write_statement(*on_sqlite)
    values = {"ids": list(ids), "token": token, **params}

    def update(conn: Connection) -> int:
        if history is not None:
            _record_history(conn, token, *history)
        raw = conn.connection.driver_connection
        if on_sqlite is not None and isinstance(raw, sqlite3.Connection):
            return raw.execute(*on_sqlite).rowcount
        return conn.execute(statement, values).rowcount

    return await db.write(update)


async def mark_delivered(
    db: Database,
    ids: Sequence[str],
    token: str,
    *,
    now: datetime,
    history: tuple[dict[str, int | None], HistoryEntry] | None = None,
) -> int:
    """sending -> delivered. Returns how many rows this lease still held.

    ``history``: the rows (id -> attempt) whose delivery ends a story worth
    keeping, and the outcome to record for them.
    """
    # Every delivery ends here: on SQLite, the driver, as for claims.
    sqlite = (_SQLITE_DELIVERED, (sqlite_time(now), token, orjson.dumps(list(ids)).decode()))
    return await _update_leased(db, _DELIVERED, ids, token, history, on_sqlite=sqlite, now=now)


async def mark_failed(
    db: Database,
    ids: Sequence[str],
    token: str,
    *,
    error: str,
    status_code: int | None,
    history: tuple[dict[str, int | None], HistoryEntry] | None = None,
) -> int:
    """sending -> failed: Inngest refused the event, or it is out of attempts."""
    return await _update_leased(
        db, _FAILED, ids, token, history, error=error, status_code=status_code
    )


async def release(
    db: Database,
    ids: Sequence[str],
    token: str,
    *,
    history: tuple[dict[str, int | None], HistoryEntry] | None = None,
) -> int:
    """sending -> pending, attempts unchanged: not sent (shutdown, or a bad event key)."""
    return await _update_leased(db, _RELEASED, ids, token, history)


async def defer(
    db: Database,
    ids: Sequence[str],
    token: str,
    *,
    until: datetime,
    error: str,
    status_code: int | None,
    history: tuple[dict[str, int | None], HistoryEntry] | None = None,
) -> int:
    """sending -> pending at ``until``, attempts unchanged: Inngest was unavailable.

    The error is recorded on the row, so an operator sees why it waits.
    """
    return await _update_leased(
        db, _DEFERRED, ids, token, history, available_at=until, error=error, status_code=status_code
    )


async def schedule_retry(
    db: Database,
    events: Sequence[ClaimedEvent],
    token: str,
    *,
    retry_at: Callable[[int], datetime],
    max_attempts: int,
    error: str,
    status_code: int | None,
    actor: str | None = None,
    now: datetime | None = None,
) -> tuple[int, int]:
    """sending -> pending at ``retry_at(attempt)``, or -> failed past ``max_attempts``.

    Each attempt's outcome goes into the history when ``actor`` is given.
    Returns (rescheduled, failed) counts of rows this lease still held.
    """
    by_attempt: dict[int, list[str]] = {}
    for event in events:
        by_attempt.setdefault(event.attempts + 1, []).append(event.id)
    at = now or datetime.now(UTC)
    updates = []
    for attempt, ids in by_attempt.items():
        params = {
            "ids": ids,
            "token": token,
            "attempt": attempt,
            "error": error,
            "status_code": status_code,
        }
        exhausted = attempt >= max_attempts
        kind = HistoryKind.FAILED if exhausted else HistoryKind.RETRY
        history = (
            ({i: attempt for i in ids}, HistoryEntry(kind, actor, at, status_code, error))
            if actor is not None
            else None
        )
        if exhausted:
            updates.append((True, _EXHAUSTED, params, history))
        else:
            params["available_at"] = retry_at(attempt)
            updates.append((False, _RETRY, params, history))

    def apply(conn: Connection) -> tuple[int, int]:
        rescheduled = failed = 0
        for exhausted, statement, params, history in updates:
            if history is not None:
                _record_history(conn, token, *history)
            count = conn.execute(statement, params).rowcount
            if exhausted:
                failed += count
            else:
                rescheduled += count
        return rescheduled, failed

    return await db.write(apply)


async def purge_delivered(db: Database, *, before: datetime, batch: int) -> int:
    """Delete up to ``batch`` rows delivered before ``before``, oldest first.

    Retention only ever deletes delivered rows: pending, sending and failed
    rows leave the outbox by delivery or by an operator's hand. Small batches
    keep each transaction (and, on PostgreSQL, its locks) short.
    """
    return await _purge(db, OutboxStatus.DELIVERED, outbox.c.delivered_at, before, batch)


async def purge_failed(db: Database, *, before: datetime, batch: int) -> int:
    """Delete up to ``batch`` failed rows created before ``before``: only ever an
    operator's explicit purge, never retention."""
    return await _purge(db, OutboxStatus.FAILED, outbox.c.created_at, before, batch)


async def _purge(
    db: Database, status: OutboxStatus, age: sa.Column[Any], before: datetime, batch: int
) -> int:
    oldest = (
        sa.select(outbox.c.id)
        .where(outbox.c.status == status, age < before)
        .order_by(age)
        .limit(batch)
        .with_for_update(skip_locked=True)
    )
    statement = outbox.delete().where(
        outbox.c.id.in_(oldest.scalar_subquery()), outbox.c.status == status
    )
    return await db.write(lambda conn: conn.execute(statement).rowcount)


# Replay: failed and delivered rows go back to pending, attempts reset. The
# last error stays (it is still the event's last error), and so does the
# status code, which makes the worker write the re-delivery into the history.
REPLAYABLE = (OutboxStatus.FAILED, OutboxStatus.DELIVERED)
_REPLAY_VALUES = {
    "status": OutboxStatus.PENDING,
    "attempts": 0,
    "available_at": sa.bindparam("now", type_=UTCDateTime),
    "delivered_at": None,
    **_CLEAR_LEASE,
}
_REPLAY = (
    outbox.update()
    .where(outbox.c.id == sa.bindparam("old_id"), outbox.c.status.in_(REPLAYABLE))
    .values(**_REPLAY_VALUES)
)
_REPLAY_NEW_ID = (
    outbox.update()
    .where(outbox.c.id == sa.bindparam("old_id"), outbox.c.status.in_(REPLAYABLE))
    .values(
        id=sa.bindparam("new_id"),
        payload=sa.bindparam("payload", type_=outbox.c.payload.type),
        origin_id=sa.func.coalesce(outbox.c.origin_id, outbox.c.id),
        **_REPLAY_VALUES,
    )
)


@dataclass(frozen=True, slots=True)
class Replayed:
    id: str  # the row's id before the replay
    new_id: str | None  # its new id, with --new-id
    was: OutboxStatus


def replay(
    conn: Connection,
    ids: Sequence[str],
    *,
    actor: str,
    now: datetime,
    new_id: Callable[[], str] | None = None,
) -> tuple[list[Replayed], dict[str, str]]:
    """failed|delivered -> pending, in the caller's transaction.

    Returns what moved and, for the rest, why not (id -> reason). With
    ``new_id``, each row gets a fresh event id (the payload's too), and keeps
    the id its client was given in ``origin_id`` and the old one in history.
    """
    # Rows in id order, so that two replays of overlapping sets cannot deadlock;
    # only replayable ones are locked (a worker's sending rows are left alone).
    found = {
        row.id: row
        for row in conn.execute(
            sa.select(outbox.c.id, outbox.c.status, sa.cast(outbox.c.payload, sa.Text))
            .where(outbox.c.id.in_(ids), outbox.c.status.in_(REPLAYABLE))
            .order_by(outbox.c.id)
            .with_for_update()
        )
    }
    missing = [i for i in ids if i not in found]
    if missing:
        found |= {
            row.id: row
            for row in conn.execute(
                sa.select(outbox.c.id, outbox.c.status, sa.null()).where(outbox.c.id.in_(missing))
            )
        }
    moved: list[Replayed] = []
    skipped: dict[str, str] = {}
    for event_id in ids:
        row = found.get(event_id)
        if row is None:
            skipped[event_id] = skip_reason(None)
            continue
        if row.status not in REPLAYABLE:
            skipped[event_id] = skip_reason(row.status)
            continue
        params: dict[str, Any] = {"old_id": event_id, "now": now}
        statement = _REPLAY
        fresh = None
        if new_id is not None:
            fresh = new_id()
            event = json.loads(row[2])
            event["id"] = fresh
            params |= {"new_id": fresh, "payload": RawJSON(_dumps_event(event))}
            statement = _REPLAY_NEW_ID
        if conn.execute(statement, params).rowcount:
            moved.append(Replayed(event_id, fresh, OutboxStatus(row.status)))
    if moved:
        conn.execute(
            outbox_history.insert(),
            [
                {
                    "event_id": r.new_id or r.id,
                    "at": now,
                    "kind": HistoryKind.REPLAYED.value,
                    "actor": actor,
                    "detail": f"was {r.was}"
                    + (f"; new id {r.new_id}, old id {r.id}" if r.new_id else ""),
                }
                for r in moved
            ],
        )
        conn.execute(_PRUNE_HISTORY, {"ids": [r.new_id or r.id for r in moved]})
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(NOTIFY_SQL)  # delivered at commit: other hosts' workers wake
    return moved, skipped


def skip_reason(status: str | None) -> str:
    """Why a replay leaves a row alone: it does not exist, or it is not replayable."""
    return f"{status}: already on its way" if status else "not found"


def _dumps_event(event: dict[str, Any]) -> str:
    return json.dumps(event, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


async def next_due_at(engine: AsyncEngine) -> datetime | None:
    """When the earliest row becomes claimable (a retry, or a lease that expires)."""
    async with engine.connect() as conn:
        pending = await conn.scalar(
            sa.select(sa.func.min(outbox.c.available_at)).where(
                outbox.c.status == OutboxStatus.PENDING
            )
        )
        leased = await conn.scalar(
            sa.select(sa.func.min(outbox.c.lease_expires_at)).where(
                outbox.c.status == OutboxStatus.SENDING
            )
        )
    times = [_as_utc(t) for t in (pending, leased) if t is not None]
    return min(times) if times else None


def _as_utc(value: datetime | str) -> datetime:
    # min() over a TypeDecorator column comes back untyped on SQLite.
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
