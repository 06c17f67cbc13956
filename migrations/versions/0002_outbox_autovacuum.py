"""outbox: autovacuum tuned for a queue table (PostgreSQL)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23

The outbox is a queue: every row is inserted, updated two or three times
(claimed, delivered) and, with retention, deleted. PostgreSQL's defaults
vacuum a table when 20 % of it is dead, which on a table of millions of
delivered rows lets tens of thousands of dead tuples pile up in front of the
claim query's index. Vacuum after 1 % (or 1000 rows), analyse after 2 %, and
leave a tenth of each page free so that status updates stay on their page
(HOT updates, no index churn). SQLite has no autovacuum; nothing to do there.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SETTINGS = {
    "autovacuum_vacuum_scale_factor": "0.01",
    "autovacuum_vacuum_threshold": "1000",
    "autovacuum_analyze_scale_factor": "0.02",
    "autovacuum_vacuum_insert_scale_factor": "0.05",
    "fillfactor": "90",
}


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    values = ", ".join(f"{key} = {value}" for key, value in SETTINGS.items())
    op.execute(f"ALTER TABLE outbox SET ({values})")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(f"ALTER TABLE outbox RESET ({', '.join(SETTINGS)})")
