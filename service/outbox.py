"""The outbox: its states and the only code that writes outbox rows.

Every change of an outbox row's status goes through this module, so the state
machine can be read in one place.
"""

from __future__ import annotations

import enum
import sqlite3
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from .db import Database, RawJSON, sqlite_time
from .models import UTCDateTime, outbox

# Version of the event's shape (the "v" field Inngest carries for us).
EVENT_SCHEMA_VERSION = "1"


class OutboxStatus(enum.StrEnum):
    # Written by the API in the same transaction as the business row. The
    # worker claims it when available_at is due; a retry puts it back here.
    PENDING = "pending"
    # Claimed by a worker under a lease (owner, token, expiry). The worker
    # moves it to delivered, back to pending (retry) or failed; if the worker
    # dies, the expired lease makes the row claimable again.
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


def enqueue(conn: Connection, events: Sequence[NewEvent]) -> None:
    """Insert new pending rows in the caller's transaction."""
    if not events:
        return
    raw = conn.connection.driver_connection
    if isinstance(raw, sqlite3.Connection):
        # The hot path: one executemany on the driver, no per-row SQLAlchemy
        # type processing (the timestamps in SQLAlchemy's own text format).
        raw.executemany(
            "INSERT INTO outbox (id, event_name, payload, status, attempts, available_at,"
            " created_at) VALUES (?, ?, ?, 'pending', 0, ?, ?)",
            [(e.id, e.name, e.payload, t := sqlite_time(e.created_at), t) for e in events],
        )
        return
    conn.execute(
        outbox.insert(),
        [
            {
                "id": e.id,
                "event_name": e.name,
                "payload": e.payload,
                "status": OutboxStatus.PENDING.value,
                "attempts": 0,
                "available_at": e.created_at,
                "created_at": e.created_at,
            }
            for e in events
        ],
    )


@dataclass(frozen=True, slots=True)
class ClaimedEvent:
    id: str
    payload: str  # the serialised event, sent as is
    attempts: int  # attempts before this one

    @property
    def size(self) -> int:
        return len(self.payload.encode("utf-8"))


@dataclass(frozen=True, slots=True)
class Claim:
    token: str  # fences every later mark: a stale token marks nothing
    owner: str
    events: list[ClaimedEvent]


# Statements are built once: constructing them per call was a visible cost.
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
    .returning(outbox.c.id, sa.cast(outbox.c.payload, sa.Text), outbox.c.attempts)
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
_RELEASED = outbox.update().where(_BY_LEASE).values(status=OutboxStatus.PENDING, **_CLEAR_LEASE)
_RETRY = (
    outbox.update()
    .where(_BY_LEASE)
    .values(
        status=OutboxStatus.PENDING,
        attempts=sa.bindparam("attempt"),
        available_at=sa.bindparam("available_at"),
        last_error=sa.bindparam("error"),
        last_status_code=sa.bindparam("status_code"),
        **_CLEAR_LEASE,
    )
)
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
        ids = list(conn.scalars(_EXPIRED, {"now": now, "limit": limit}))
        if len(ids) < limit:
            ids.extend(conn.scalars(_DUE, {"now": now, "limit": limit - len(ids)}))
        if not ids:
            return Claim(token, owner, [])
        rows = conn.execute(
            _LEASE, {"ids": ids, "owner": owner, "token": token, "expires_at": expires_at}
        )
        by_id = {row[0]: ClaimedEvent(row[0], row[1], row[2]) for row in rows}
        # Oldest first, as claimed.
        return Claim(token, owner, [by_id[i] for i in ids if i in by_id])

    return await db.write(claim)


async def _update_leased(
    db: Database, statement: sa.Update, ids: Sequence[str], token: str, **params: Any
) -> int:
    """Run ``statement`` on the rows this lease still holds; how many it held."""
    if not ids:
        return 0
    values = {"ids": list(ids), "token": token, **params}
    return await db.write(lambda conn: conn.execute(statement, values).rowcount)


async def mark_delivered(db: Database, ids: Sequence[str], token: str, *, now: datetime) -> int:
    """sending -> delivered. Returns how many rows this lease still held."""
    return await _update_leased(db, _DELIVERED, ids, token, now=now)


async def mark_failed(
    db: Database, ids: Sequence[str], token: str, *, error: str, status_code: int | None
) -> int:
    """sending -> failed: Inngest refused the event, or it is out of attempts."""
    return await _update_leased(db, _FAILED, ids, token, error=error, status_code=status_code)


async def release(db: Database, ids: Sequence[str], token: str) -> int:
    """sending -> pending, attempts unchanged: not sent (shutdown, or a bad event key)."""
    return await _update_leased(db, _RELEASED, ids, token)


async def schedule_retry(
    db: Database,
    events: Sequence[ClaimedEvent],
    token: str,
    *,
    retry_at: Callable[[int], datetime],
    max_attempts: int,
    error: str,
    status_code: int | None,
) -> tuple[int, int]:
    """sending -> pending at ``retry_at(attempt)``, or -> failed past ``max_attempts``.

    Returns (rescheduled, failed) counts of rows this lease still held.
    """
    by_attempt: dict[int, list[str]] = {}
    for event in events:
        by_attempt.setdefault(event.attempts + 1, []).append(event.id)
    updates = []
    for attempt, ids in by_attempt.items():
        params = {
            "ids": ids,
            "token": token,
            "attempt": attempt,
            "error": error,
            "status_code": status_code,
        }
        if attempt >= max_attempts:
            updates.append((True, _EXHAUSTED, params))
        else:
            updates.append((False, _RETRY, {**params, "available_at": retry_at(attempt)}))

    def apply(conn: Connection) -> tuple[int, int]:
        rescheduled = failed = 0
        for exhausted, statement, params in updates:
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
    oldest = (
        sa.select(outbox.c.id)
        .where(outbox.c.status == OutboxStatus.DELIVERED, outbox.c.delivered_at < before)
        .order_by(outbox.c.delivered_at)
        .limit(batch)
        .with_for_update(skip_locked=True)
    )
    statement = outbox.delete().where(
        outbox.c.id.in_(oldest.scalar_subquery()), outbox.c.status == OutboxStatus.DELIVERED
    )
    return await db.write(lambda conn: conn.execute(statement).rowcount)


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
