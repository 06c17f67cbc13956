"""outbox: attempt history, replayed ids, and an index on failed rows

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23

- outbox_history keeps, for rows that did not go through on their first try,
  each attempt's outcome and each operator replay, so that `show` can tell the
  story. Rows delivered at once write nothing here (the hot path stays as it
  was), and each event keeps only its newest entries (see outbox.HISTORY_LIMIT).
  The foreign key cascades: retention's deletes take the history along, and a
  replay with a new id carries it to the new id.
- outbox.origin_id: the id a client was first given, when a replay gave the
  event a new one, so the client's id still finds the event.
- ix_outbox_failed_created: the failed rows, for operators' lists and stats,
  without reading the delivered history.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UTCDateTime = sa.DateTime(timezone=True)
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "outbox_history",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.String(36), nullable=False),
        sa.Column("at", UTCDateTime, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=True),
        sa.Column("status_code", sa.Integer, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("detail", sa.Text, nullable=True),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["outbox.id"],
            name="fk_outbox_history_event_id_outbox",
            ondelete="CASCADE",
            onupdate="CASCADE",
        ),
        sa.CheckConstraint(
            "kind IN ('retry', 'failed', 'delivered', 'held', 'replayed')",
            name="ck_outbox_history_kind_valid",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_outbox_history"),
    )
    op.create_index("ix_outbox_history_event_id_id", "outbox_history", ["event_id", "id"])
    op.create_index("ix_outbox_history_kind_at", "outbox_history", ["kind", "at"])
    # Plain ALTER TABLE on both databases (SQLite adds and, since 3.35, drops a
    # column in place): copying the outbox in batch mode would be slow on a big
    # table and would have to recreate its partial indexes.
    op.add_column("outbox", sa.Column("origin_id", sa.String(36), nullable=True))
    op.create_index(
        "ix_outbox_origin_id",
        "outbox",
        ["origin_id"],
        sqlite_where=sa.text("origin_id IS NOT NULL"),
        postgresql_where=sa.text("origin_id IS NOT NULL"),
    )
    op.create_index(
        "ix_outbox_failed_created",
        "outbox",
        ["created_at"],
        sqlite_where=sa.text("status = 'failed'"),
        postgresql_where=sa.text("status = 'failed'"),
    )


def downgrade() -> None:
    op.drop_index("ix_outbox_failed_created", table_name="outbox")
    op.drop_index("ix_outbox_origin_id", table_name="outbox")
    op.drop_column("outbox", "origin_id")
    op.drop_index("ix_outbox_history_kind_at", table_name="outbox_history")
    op.drop_index("ix_outbox_history_event_id_id", table_name="outbox_history")
    op.drop_table("outbox_history")
