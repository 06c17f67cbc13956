"""The outbox's hot statements on PostgreSQL, for asyncpg itself: the intake's
documents and events, relayed events, the claim and the delivered mark.

Each is ONE statement however many rows it carries (arrays, unnest), run
outside any explicit transaction: PostgreSQL runs a lone statement as a
transaction of its own, all of it or nothing, so BEGIN and COMMIT cost no
round trips of their own. asyncpg prepares each once a connection and reuses
it. Everything else stays with SQLAlchemy Core.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from ..contract import (
    Claim,
    ClaimedEvent,
    HandOff,
    NewEvent,
    OutboxStatus,
    Submission,
    lease_values,
)
from .listener import CHANNEL

PENDING, SENDING, DELIVERED = (
    f"'{s.value}'" for s in (OutboxStatus.PENDING, OutboxStatus.SENDING, OutboxStatus.DELIVERED)
)

# The documents and their events, in one statement: the two INSERTs are
# data-modifying CTEs of it, so they commit together or not at all. The NOTIFY
# that wakes other hosts' workers goes with rows written pending ($7), and
# PostgreSQL delivers it at the commit.
SUBMISSIONS = f"""
WITH documents AS (
    INSERT INTO documents (user_id, document_name, event_id, request_hash, created_at)
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::varchar[], $4::varchar[],
                         $5::timestamptz[])
), events AS (
    INSERT INTO outbox (id, event_name, payload, status, attempts, available_at, created_at,
                        lease_owner, lease_token, lease_expires_at)
    SELECT e.id, e.name, e.payload::json, $7, 0, e.at, e.at, $8, $9, $10
    FROM unnest($3::varchar[], $6::text[], $11::text[], $5::timestamptz[])
        AS e(id, name, payload, at)
)
SELECT pg_notify('{CHANNEL}', '') WHERE $7 = {PENDING}
"""


def submission_args(subs: Sequence[Submission], hand_off: HandOff | None) -> tuple[Any, ...]:
    """SUBMISSIONS's parameters: a column an array."""
    return (
        [s.user_id for s in subs],
        [s.document_name for s in subs],
        [s.event.id for s in subs],
        [s.request_hash for s in subs],
        [s.event.created_at for s in subs],
        [s.event.name for s in subs],
        *lease_values(hand_off),
        [s.event.payload for s in subs],
    )


# Relayed events, and their keys' last use, in one statement. An id already in
# the outbox is left as it is, and so is the second of an id met twice in the
# batch (an id's rows go in the batch's order); RETURNING names the rows written. A key's
# last use only moves forward, whichever batch commits first. The NOTIFY goes
# with rows written pending.
RELAYED = f"""
WITH events AS (
    INSERT INTO outbox (id, event_name, payload, status, attempts, available_at, created_at,
                        lease_owner, lease_token, lease_expires_at, origin)
    SELECT e.id, e.name, e.payload::json, $6, 0, e.at, e.at, $7, $8, $9, e.origin
    FROM unnest($1::varchar[], $2::text[], $3::text[], $4::timestamptz[], $5::varchar[])
        WITH ORDINALITY AS e(id, name, payload, at, origin, n)
    -- In id order, so that batches holding the same new ids never wait on
    -- each other's in opposite orders; the first of an id met twice first.
    ORDER BY e.id, e.n
    ON CONFLICT (id) DO NOTHING
    RETURNING id
), keys AS (
    -- Locked in the order of their names, so that batches sharing keys
    -- (other hosts', a bisected batch's halves) never deadlock.
    SELECT relay_keys.name, k.at FROM relay_keys
    JOIN unnest($10::varchar[], $11::timestamptz[]) AS k(name, at) ON relay_keys.name = k.name
    ORDER BY relay_keys.name
    FOR NO KEY UPDATE OF relay_keys
), used AS (
    UPDATE relay_keys SET last_used_at = keys.at FROM keys
    WHERE relay_keys.name = keys.name
      AND (relay_keys.last_used_at IS NULL OR relay_keys.last_used_at < keys.at)
)
SELECT id FROM events
UNION ALL
SELECT NULL FROM (SELECT pg_notify('{CHANNEL}', '')) AS notified
WHERE $6 = {PENDING} AND EXISTS (SELECT FROM events)
"""


def relayed_args(
    rows: Sequence[tuple[NewEvent, str]],
    hand_off: HandOff | None,
    last_used: dict[str, datetime],
) -> tuple[Any, ...]:
    """RELAYED's parameters: a column an array."""
    return (
        [e.id for e, _ in rows],
        [e.name for e, _ in rows],
        [e.payload for e, _ in rows],
        [e.created_at for e, _ in rows],
        [origin for _, origin in rows],
        *lease_values(hand_off),
        sorted(last_used),
        [last_used[name] for name in sorted(last_used)],
    )


def written_ids(records: Sequence[Any]) -> set[str]:
    """The ids RELAYED wrote (its NOTIFY's row has none)."""
    return {record[0] for record in records if record[0] is not None}


# Expired leases first, then due rows, each oldest first, up to $2 in all;
# rows another worker has locked are skipped. ``position`` keeps that order,
# which RETURNING does not.
CLAIM = f"""
WITH expired AS (
    SELECT id, lease_expires_at AS due FROM outbox
    WHERE status = {SENDING} AND lease_expires_at <= $1
    ORDER BY lease_expires_at LIMIT $2 FOR UPDATE SKIP LOCKED
), due AS (
    SELECT id, available_at AS due FROM outbox
    WHERE status = {PENDING} AND available_at <= $1
    ORDER BY available_at LIMIT greatest($2 - (SELECT count(*) FROM expired), 0)
    FOR UPDATE SKIP LOCKED
), picked AS (
    SELECT id, row_number() OVER (ORDER BY expired DESC, due) AS position FROM (
        SELECT id, due, true AS expired FROM expired
        UNION ALL SELECT id, due, false FROM due
    ) AS both_kinds
)
UPDATE outbox SET status = {SENDING}, lease_owner = $3, lease_token = $4, lease_expires_at = $5
FROM picked WHERE outbox.id = picked.id
RETURNING outbox.id, outbox.payload::text, outbox.attempts,
          -- Either set: an earlier outcome (a timeout or a dropped connection
          -- has an error and no status code).
          outbox.last_status_code IS NOT NULL OR outbox.last_error IS NOT NULL, picked.position
"""


def claimed(token: str, owner: str, rows: Sequence[Any]) -> Claim:
    """CLAIM's rows as a Claim, in the order claimed."""
    ordered = sorted(rows, key=lambda row: row[4])
    return Claim(
        token,
        owner,
        [ClaimedEvent(row[0], row[1], row[2], row[3]) for row in ordered],
    )


# By id and lease token: the token stands for the status (OutboxStatus.SENDING),
# so the rows are found through the primary key, a probe an id.
DELIVERED_MARK = (
    f"UPDATE outbox SET status = {DELIVERED}, attempts = attempts + 1, delivered_at = $1,"
    " last_status_code = 200, lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL"
    " WHERE id = any($3::varchar[]) AND lease_token = $2"
)


def row_count(status: str) -> int:
    """The rows an UPDATE touched, from asyncpg's status ("UPDATE 3")."""
    return int(status.rsplit(" ", 1)[1])
