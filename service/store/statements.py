"""Statements every backend runs as they are: the base store's delivered mark."""

from __future__ import annotations

import sqlalchemy as sa

from ..models import outbox
from .contract import OutboxStatus

# sending -> delivered for the rows a lease still holds (see outbox.mark_delivered):
# the base store's mark_delivered, and the outbox's when a history entry rides along.
# The lease's token stands for the status (see OutboxStatus.SENDING).
DELIVERED = (
    outbox.update()
    .where(
        outbox.c.id.in_(sa.bindparam("ids", expanding=True)),
        outbox.c.lease_token == sa.bindparam("token"),
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
