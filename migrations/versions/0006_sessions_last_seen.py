"""sessions.last_seen_at: the idle timeout

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01

A session unused for SESSION_IDLE_SECONDS is refused, whatever its absolute
age. Each process writes the time it last saw the session in use (at most about
once a minute per session). Rows from before this revision have none: their
creation time stands for it.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Added in place (SQLite and PostgreSQL both can): no copy of the table.
    op.add_column("sessions", sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("sessions", "last_seen_at")
