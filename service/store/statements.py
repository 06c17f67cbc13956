"""Statements both backends run as they are: the base store's delivered mark,
and those that differ only in how their parameters are typed."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from ..models import UTCDateTime, outbox, outbox_history
from .contract import OutboxStatus


def history_if_leased(*, typed: bool) -> sa.Insert:
    """A history entry for a row, written only while the caller's lease still
    holds it (so a late answer records nothing, as it marks nothing).
    ``typed``: PostgreSQL needs the parameters' types spelled out in a SELECT
    list; SQLite must not get a CAST, which would turn its timestamp text into
    a number."""

    def param(name: str, type_: Any) -> sa.ColumnElement[Any]:
        bound = sa.bindparam(name, type_=type_)
        return sa.cast(bound, type_) if typed else bound

    return outbox_history.insert().from_select(
        ["event_id", "at", "kind", "attempt", "status_code", "error", "actor"],
        sa.select(
            outbox.c.id,
            param("at", UTCDateTime()),
            param("kind", sa.String(16)),
            param("attempt", sa.Integer()),
            param("status_code", sa.Integer()),
            param("error", sa.Text()),
            param("actor", sa.String(255)),
        ).where(
            outbox.c.id == sa.bindparam("event_id"),
            outbox.c.lease_token == sa.bindparam("token"),
            outbox.c.status == OutboxStatus.SENDING,
        ),
    )


# sending -> delivered for the rows a lease still holds (see outbox.mark_delivered):
# the base store's mark_delivered, and the outbox's when a history entry rides along.
DELIVERED = (
    outbox.update()
    .where(
        outbox.c.id.in_(sa.bindparam("ids", expanding=True)),
        outbox.c.lease_token == sa.bindparam("token"),
        outbox.c.status == OutboxStatus.SENDING,
    )
    .values(
        status=OutboxStatus.DELIVERED,
        attempts=outbox.c.attempts + 1,
        delivered_at=sa.bindparam("now"),
        last_status_code=200,
        lease_owner=None,
        lease_token=None,
        lease_expires_at=None,
    )
)
