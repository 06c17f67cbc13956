"""users.disabled_at: a user an operator has disabled

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01

`inngest-outbox users disable NAME` sets it (and revokes the user's sessions);
a disabled user's logins fail as a wrong password does, and its sessions are
refused. `users enable NAME` clears it.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("users", sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("users", "disabled_at")
