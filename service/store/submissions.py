"""The intake's rows as SQLAlchemy statements: documents with an
Idempotency-Key (the key may be taken), and every document on a backend
without a faster path. Run inside the caller's transaction."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..models import documents
from .contract import Accepted, HandOff, IdempotencyKeyReused, IntakeError, NewEvent, Submission
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
