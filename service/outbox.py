"""The outbox: the only code that moves outbox rows between their states.

The states, and who moves a row in and out of each, are OutboxStatus (in
store/contract.py, the types the storage boundary shares); every move is a
function here, so the state machine can be read in one place. What is the
same on every backend is a statement here; what is not is a verb of the store
(claim, enqueue, notify, and the delivered mark that every event takes, whose
statement is the store's: store/statements.py).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from .models import UTCDateTime, outbox, outbox_history
from .store.contract import (
    Claim,
    ClaimedEvent,
    HandOff,
    HistoryEntry,
    HistoryKind,
    NewEvent,
    OutboxStatus,
)
from .store.database import Database
from .store.encoding import RawJSON
from .store.statements import DELIVERED

__all__ = [
    "Claim",
    "ClaimedEvent",
    "HandOff",
    "HistoryEntry",
    "HistoryKind",
    "NewEvent",
    "OutboxStatus",
]

# Version of the event's shape (the "v" field Inngest carries for us).
EVENT_SCHEMA_VERSION = "1"
# The newest history entries kept per event: a retry loop, or an event
# replayed again and again, cannot grow the history without end.
HISTORY_LIMIT = 25


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


async def enqueue(db: Database, events: Sequence[NewEvent]) -> None:
    """New rows, pending, in a transaction of their own."""
    await db.write(lambda conn: db.enqueue(conn, events))


# Statements are built once, not per call: building one is a visible cost on the hot path.
# The lease's token stands for the status too (see OutboxStatus.SENDING).
_BY_LEASE = sa.and_(
    outbox.c.id.in_(sa.bindparam("ids", expanding=True)),
    outbox.c.lease_token == sa.bindparam("token"),
)
_CLEAR_LEASE = {"lease_owner": None, "lease_token": None, "lease_expires_at": None}
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
    """pending (due) or sending (lease expired) -> sending, leased to ``owner``:
    up to ``limit`` rows, expired leases first, then due rows, oldest first.

    The claim commits before anything is sent, so no transaction or row lock
    is held while a request to Inngest is in flight. Concurrent workers never
    take each other's rows (how is the store's: row locks skipped on
    PostgreSQL, one writer on SQLite). Each claim's fresh token fences every
    later mark.
    """
    return await db.claim(
        token=str(uuid.uuid4()),
        owner=owner,
        limit=limit,
        now=now,
        expires_at=now + timedelta(seconds=lease_seconds),
    )


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


# A history entry for a row, written only while the caller's lease still holds
# it (so a late answer records nothing, as it marks nothing). The parameters
# in the SELECT list are typed: asyncpg's dialect casts each ($1::INTEGER),
# as PostgreSQL cannot infer a type there; SQLite needs none.
_HISTORY_IF_LEASED = outbox_history.insert().from_select(
    ["event_id", "at", "kind", "attempt", "status_code", "error", "actor"],
    sa.select(
        outbox.c.id,
        sa.bindparam("at", type_=UTCDateTime()),
        sa.bindparam("kind", type_=sa.String(16)),
        sa.bindparam("attempt", type_=sa.Integer()),
        sa.bindparam("status_code", type_=sa.Integer()),
        sa.bindparam("error", type_=sa.Text()),
        sa.bindparam("actor", type_=sa.String(255)),
    ).where(
        outbox.c.id == sa.bindparam("event_id"),
        outbox.c.lease_token == sa.bindparam("token"),
    ),
)


def _record_history(
    db: Database,
    conn: Connection,
    token: str,
    attempts: dict[str, int | None],
    outcome: HistoryEntry,
) -> None:
    """Call before the mark's own update, while the rows are still leased."""
    if not attempts:
        return
    conn.execute(
        _HISTORY_IF_LEASED,
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
    **params: Any,
) -> int:
    """Run ``statement`` on the rows this lease still holds; how many it held."""
    if not ids:
        return 0
    values = {"ids": list(ids), "token": token, **params}

    def update(conn: Connection) -> int:
        if history is not None:
            _record_history(db, conn, token, *history)
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
    if ids and history is None:
        # Every delivery ends here: the store's fastest way.
        return await db.mark_delivered(ids, token, now)
    return await _update_leased(db, DELIVERED, ids, token, history, now=now)


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
                _record_history(db, conn, token, *history)
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
    db: Database,
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
        db.notify(conn)  # other processes' workers wake at the commit
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
