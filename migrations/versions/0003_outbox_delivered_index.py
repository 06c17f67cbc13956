"""outbox: partial index on delivered_at for retention

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23

Retention deletes delivered rows oldest first, a small batch at a time; this
index finds them without reading the pending or failed rows, and (partial)
holds nothing else.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_outbox_delivered_at",
        "outbox",
        ["delivered_at"],
        sqlite_where=sa.text("status = 'delivered'"),
        postgresql_where=sa.text("status = 'delivered'"),
    )


def downgrade() -> None:
    op.drop_index("ix_outbox_delivered_at", table_name="outbox")
