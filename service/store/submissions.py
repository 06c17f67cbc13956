"""The intake's rows as SQLAlchemy statements: documents with an
Idempotency-Key (the key may be taken), every document on a backend without a
faster path, and relayed events. Run inside the caller's transaction."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..models import documents, relay_keys
from .contract import (
    Accepted,
    HandOff,
    IdempotencyKeyReused,
    IntakeError,
    NewEvent,
    Relayed,
    RelayRequest,
    Submission,
)
from .database import PendingSubmission, Written

# The dialect's INSERT construct (it has on_conflict_do_nothing).
Insert = Callable[[sa.Table], Any]
Enqueue = Callable[[Connection, Sequence[NewEvent], HandOff | None], None]


def write_submissions(
    conn: Connection,
    batch: Sequence[PendingSubmission],
    hand_off: HandOff | None,
    *,
    insert: Insert,
    enqueue: Enqueue,
    before_commit: Callable[[], None] | None = None,
) -> Written:
    """Both rows of every submission; each request's result, and the new events.

    A request cancelled before its transaction began is left out (None); one
    cancelled later is written whole, so a retry with its Idempotency-Key finds it.
    """
    results: list[Accepted | IntakeError | None] = []
    plain: list[Submission] = []
    fresh: list[NewEvent] = []
    for pending in batch:
        if pending.future.cancelled():
            results.append(None)
            continue
        sub = pending.submission
        if sub.idempotency_key is None:
            plain.append(sub)
            fresh.append(sub.event)
            results.append(Accepted(sub.event.id))
            continue
        result = _insert_keyed(conn, sub, insert)
        results.append(result)
        if isinstance(result, Accepted) and not result.replayed:
            fresh.append(sub.event)
    if plain:
        conn.execute(documents.insert(), [_document_row(s) for s in plain])
    enqueue(conn, fresh, hand_off)
    if before_commit is not None:
        before_commit()
    return results, fresh


def _insert_keyed(conn: Connection, sub: Submission, insert: Insert) -> Accepted | IntakeError:
    """Insert unless this user already used the key (then answer as the first time)."""
    statement = (
        insert(documents)
        .values(_document_row(sub))
        .on_conflict_do_nothing(index_elements=["user_id", "idempotency_key"])
        .returning(documents.c.id)
    )
    if conn.execute(statement).first() is not None:
        return Accepted(sub.event.id)
    first = conn.execute(
        sa.select(documents.c.event_id, documents.c.request_hash).where(
            documents.c.user_id == sub.user_id,
            documents.c.idempotency_key == sub.idempotency_key,
        )
    ).one()
    if first.request_hash != sub.request_hash:
        return IdempotencyKeyReused()
    return Accepted(first.event_id, replayed=True)


def _document_row(sub: Submission) -> dict[str, object]:
    return {
        "user_id": sub.user_id,
        "document_name": sub.document_name,
        "event_id": sub.event.id,
        "idempotency_key": sub.idempotency_key,
        "request_hash": sub.request_hash,
        "created_at": sub.event.created_at,
    }


# Each key's last use: its own latest request, never moved back (by a batch
# that commits after a later one).
_KEY_USED = (
    relay_keys.update()
    .where(
        relay_keys.c.name == sa.bindparam("key_name"),
        sa.or_(relay_keys.c.last_used_at.is_(None), relay_keys.c.last_used_at < sa.bindparam("at")),
    )
    .values(last_used_at=sa.bindparam("at"))
)

# Inserts relayed events with their origins, skipping ids already in the outbox;
# the ids it wrote.
InsertRelayed = Callable[[Connection, list[tuple[NewEvent, str]], HandOff | None], set[str]]


def write_relayed(
    conn: Connection,
    batch: Sequence[PendingSubmission],
    hand_off: HandOff | None,
    *,
    insert: InsertRelayed,
    before_commit: Callable[[], None] | None = None,
) -> Written:
    """The events of every relay request not cancelled before its transaction
    began; each request's result, and the events written. An id met twice (in
    the outbox already, or earlier in the batch) is written once, and counted
    as stored by the first request that holds it."""
    relayed = RelayedBatch(batch)
    written = insert(conn, relayed.rows, hand_off) if relayed.rows else set()
    if relayed.last_used:
        conn.execute(
            _KEY_USED, [{"key_name": n, "at": at} for n, at in sorted(relayed.last_used.items())]
        )
    if before_commit is not None:
        before_commit()
    return relayed.results(written)


class RelayedBatch:
    """What a batch of relay requests writes, and what it answers once written."""

    __slots__ = ("requests", "rows", "last_used")

    def __init__(self, batch: Sequence[PendingSubmission]) -> None:
        # None: a request cancelled before its transaction began, left out.
        self.requests: list[RelayRequest | None] = [
            None if p.future.cancelled() else p.submission for p in batch
        ]
        kept = [r for r in self.requests if r is not None]
        self.rows = [(event, r.origin) for r in kept for event in r.events]
        # Each key's last use: its latest request of the batch.
        self.last_used: dict[str, datetime] = {}
        for r in kept:
            self.last_used[r.origin] = max(
                r.received_at, self.last_used.get(r.origin, r.received_at)
            )

    def results(self, written: set[str]) -> Written:
        """Each request's result given the ids written, and the events written:
        an id met twice is the first holder's."""
        written = set(written)
        results: list[Relayed | None] = []
        fresh: list[NewEvent] = []
        for request in self.requests:
            if request is None:
                results.append(None)
                continue
            stored = 0
            for event in request.events:
                if event.id in written:
                    written.discard(event.id)  # the first to hold it
                    fresh.append(event)
                    stored += 1
            results.append(Relayed(stored))
        return results, fresh
