"""The store on PostgreSQL: each write a transaction of its own on the async
engine; claims with FOR UPDATE SKIP LOCKED, so that workers on many hosts never
wait for nor take each other's rows; a NOTIFY at the commit of new rows wakes
every host's workers (listener.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection

from ...models import UTCDateTime, outbox
from ..contract import Claim, ClaimedEvent, HandOff, NewEvent, OutboxStatus, lease_values
from ..database import Database, Done, PendingSubmission, RowsRefused
from ..submissions import write_relayed, write_submissions
from .listener import NOTIFY_SQL, Listener


def _claimable(status: OutboxStatus, due: sa.Column[Any]) -> sa.Select[Any]:
    """Rows in ``status`` whose ``due`` time has come, oldest first, skipping
    rows another worker has locked."""
    return (
        sa.select(outbox.c.id)
        .where(outbox.c.status == status, due <= sa.bindparam("now", type_=UTCDateTime))
        .order_by(due)
        .limit(sa.bindparam("limit"))
        .with_for_update(skip_locked=True)
    )


# Statements are built once, not per call: building one costs more than running it.
_EXPIRED = _claimable(OutboxStatus.SENDING, outbox.c.lease_expires_at)
_DUE = _claimable(OutboxStatus.PENDING, outbox.c.available_at)
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
        # Either set means an earlier outcome (a timeout or a dropped
        # connection has an error and no status code).
        outbox.c.last_status_code,
        outbox.c.last_error,
    )
)


# Relayed events: an id already in the outbox is left as it is (and the second
# of an id met twice in one statement); RETURNING names the rows written.
_RELAYED = (
    postgresql.insert(outbox)
    .on_conflict_do_nothing(index_elements=[outbox.c.id])
    .returning(outbox.c.id)
)


class PostgresDatabase(Database):
    def __init__(self, url: str, *, rows_process: bool = False, **engine_kwargs: Any) -> None:
        super().__init__(url, **engine_kwargs)  # rows_process: SQLite's alone

    def insert_submissions(
        self, batch: Sequence[PendingSubmission], hand_off: HandOff | None, done: Done
    ) -> None:
        self.submit(
            lambda conn: write_submissions(
                conn,
                batch,
                hand_off,
                insert=postgresql.insert,
                enqueue=self.enqueue,
                before_commit=self.before_commit,
            ),
            _refusals_named(done),
        )

    def insert_relayed(
        self, batch: Sequence[PendingSubmission], hand_off: HandOff | None, done: Done
    ) -> None:
        self.submit(
            lambda conn: write_relayed(
                conn, batch, hand_off, insert=self._insert_relayed, before_commit=self.before_commit
            ),
            _refusals_named(done),
        )

    def _insert_relayed(
        self, conn: Connection, rows: list[tuple[NewEvent, str]], hand_off: HandOff | None
    ) -> set[str]:
        status, owner, token, expires_at = lease_values(hand_off)
        values = [
            {
                "id": e.id,
                "event_name": e.name,
                "payload": e.payload,
                "origin": origin,
                "status": status,
                "attempts": 0,
                "available_at": e.created_at,
                "created_at": e.created_at,
                "lease_owner": owner,
                "lease_token": token,
                "lease_expires_at": expires_at,
            }
            for e, origin in rows
        ]
        # One INSERT of many VALUES rows (SQLAlchemy's insertmanyvalues).
        written = set(conn.scalars(_RELAYED, values))
        if written and hand_off is None:
            self.notify(conn)
        return written

    def enqueue(
        self, conn: Connection, events: Sequence[NewEvent], hand_off: HandOff | None = None
    ) -> None:
        if not events:
            return
        status, owner, token, expires_at = lease_values(hand_off)
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
        if hand_off is None:  # handed-off rows are this process's worker's already
            self.notify(conn)

    def serialize(self, conn: Connection, keys: Sequence[str]) -> None:
        # A transaction-scoped advisory lock a key, taken in order: no deadlock.
        for key in sorted(keys):
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(sa.func.hashtext(key))))

    def notify(self, conn: Connection) -> None:
        conn.exec_driver_sql(NOTIFY_SQL)  # delivered at commit, to every host's workers

    async def claim(
        self, *, token: str, owner: str, limit: int, now: datetime, expires_at: datetime
    ) -> Claim:
        def claim(conn: Connection) -> Claim:
            ids = list(conn.scalars(_EXPIRED, {"now": now, "limit": limit}))
            if len(ids) < limit:
                ids.extend(conn.scalars(_DUE, {"now": now, "limit": limit - len(ids)}))
            if not ids:
                return Claim(token, owner, [])
            rows = conn.execute(
                _LEASE, {"ids": ids, "owner": owner, "token": token, "expires_at": expires_at}
            )
            by_id = {
                row[0]: ClaimedEvent(
                    row[0], row[1], row[2], row[3] is not None or row[4] is not None
                )
                for row in rows
            }
            # Oldest first, as claimed.
            return Claim(token, owner, [by_id[i] for i in ids if i in by_id])

        return await self.write(claim)

    def minute_of(self, column: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
        minute = sa.func.date_trunc("minute", sa.func.timezone("UTC", column))
        return sa.type_coerce(minute, UTCDateTime())

    def listen(self, wake: asyncio.Event) -> Coroutine[Any, Any, None]:
        return Listener(self.url, wake).run()


def _refusals_named(done: Done) -> Done:
    """A refused row (a constraint, a value out of range) reaches the intake as RowsRefused."""

    def answer(result: Any, error: BaseException | None) -> None:
        if isinstance(error, sa.exc.IntegrityError | sa.exc.DataError):
            refused = RowsRefused(str(error))
            refused.__cause__ = error
            error = refused
        done(result, error)

    return answer
