"""relay keys, and where an outbox row came from

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-08

- relay_keys: the keys Inngest SDKs send events to `POST /e/{key}` with. Only
  a SHA-256 hash of each key is kept; `inngest-outbox keys add` prints the key
  once. A revoked key stays (its name is in the history of its events).
- outbox.origin: the name of the relay key that sent the event (NULL: POST /api).
- Event ids chosen by an SDK's caller can be longer than our UUIDs: the id
  columns take 255 characters. Only PostgreSQL enforces a VARCHAR's length;
  SQLite ignores it, so its tables are not copied for it.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UTCDateTime = sa.DateTime(timezone=True)
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_WIDENED = (("outbox", "id"), ("outbox", "origin_id"), ("outbox_history", "event_id"))


def upgrade() -> None:
    op.create_table(
        "relay_keys",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("last_used_at", UTCDateTime, nullable=True),
        sa.Column("revoked_at", UTCDateTime, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_relay_keys"),
        sa.UniqueConstraint("name", name="uq_relay_keys_name"),
        sa.UniqueConstraint("key_hash", name="uq_relay_keys_key_hash"),
    )
    # Plain ALTER TABLE on both databases: no copy of the outbox.
    op.add_column("outbox", sa.Column("origin", sa.String(64), nullable=True))
    if op.get_bind().dialect.name == "postgresql":
        for table, column in _WIDENED:
            op.alter_column(table, column, type_=sa.String(255), existing_type=sa.String(36))


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        # Rows with longer ids would not fit: they go with the relay.
        op.execute("DELETE FROM outbox WHERE length(id) > 36")
        op.execute("UPDATE outbox SET origin_id = NULL WHERE length(origin_id) > 36")
        for table, column in _WIDENED:
            op.alter_column(table, column, type_=sa.String(36), existing_type=sa.String(255))
    op.drop_column("outbox", "origin")
    op.drop_table("relay_keys")
