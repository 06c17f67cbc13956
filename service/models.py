"""Tables, as SQLAlchemy Core. The schema itself is owned by Alembic (migrations/)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on every database.

    SQLite has no time zone type; SQLAlchemy stores the naive text form, which
    sorts correctly as long as everything written is UTC.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime; use datetime.now(UTC)")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# The event is kept as the exact text that was measured at ingest and is sent
# to Inngest: PostgreSQL's json type stores the text as written, where jsonb
# would rewrite it (1e308 becomes 309 digits) and refuse \u0000.
EventText = sa.JSON()
# SQLite's INTEGER PRIMARY KEY is the rowid; BIGINT would not autoincrement.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
# Event ids chosen by a relayed event's sender may be longer than a UUID. SQLite
# ignores a VARCHAR's length, and its tables keep their first declaration.
EventId = sa.String(255).with_variant(sa.String(36), "sqlite")
MAX_EVENT_ID_LENGTH = 255

users = sa.Table(
    "users",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("username", sa.String(64), nullable=False, unique=True),
    sa.Column("password_hash", sa.String(255), nullable=False),
    sa.Column("is_admin", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", UTCDateTime, nullable=False),
    # Set by an operator: no login, no session (see auth.set_disabled).
    sa.Column("disabled_at", UTCDateTime, nullable=True),
)

documents = sa.Table(
    "documents",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("user_id", BigId, sa.ForeignKey("users.id"), nullable=False),
    sa.Column("document_name", sa.Text, nullable=False),
    # Not a foreign key: delivered outbox rows are purged, documents stay.
    sa.Column("event_id", sa.String(36), nullable=False, unique=True),
    sa.Column("idempotency_key", sa.String(255), nullable=True),
    # sha256 of the canonical request body, to refuse a reused key with another body.
    sa.Column("request_hash", sa.String(64), nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.UniqueConstraint("user_id", "idempotency_key"),
)

outbox = sa.Table(
    "outbox",
    metadata,
    # The Inngest event id: ours (a UUID), or one chosen by a relayed event's sender.
    sa.Column("id", EventId, primary_key=True),
    sa.Column("event_name", sa.String(255), nullable=False),
    sa.Column("payload", EventText, nullable=False),  # the whole event, as sent
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("available_at", UTCDateTime, nullable=False),
    sa.Column("lease_owner", sa.String(255), nullable=True),
    sa.Column("lease_token", sa.String(36), nullable=True),
    sa.Column("lease_expires_at", UTCDateTime, nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("last_status_code", sa.Integer, nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("delivered_at", UTCDateTime, nullable=True),
    # The id the client was given, once a replay with --new-id changed ``id``.
    sa.Column("origin_id", EventId, nullable=True),
    # The name of the relay key that sent the event (POST /e/{key}); NULL: POST /api.
    sa.Column("origin", sa.String(64), nullable=True),
    sa.CheckConstraint(
        "status IN ('pending', 'sending', 'delivered', 'failed')", name="status_valid"
    ),
)

# The claim query reads only these two states; partial indexes stay small while
# the delivered history grows.
sa.Index(
    "ix_outbox_pending_due",
    outbox.c.available_at,
    sqlite_where=outbox.c.status == "pending",
    postgresql_where=outbox.c.status == "pending",
)
sa.Index(
    "ix_outbox_sending_lease",
    outbox.c.lease_expires_at,
    sqlite_where=outbox.c.status == "sending",
    postgresql_where=outbox.c.status == "sending",
)
sa.Index(
    "ix_outbox_delivered_at",
    outbox.c.delivered_at,
    sqlite_where=outbox.c.status == "delivered",
    postgresql_where=outbox.c.status == "delivered",
)
sa.Index(
    "ix_outbox_failed_created",
    outbox.c.created_at,
    sqlite_where=outbox.c.status == "failed",
    postgresql_where=outbox.c.status == "failed",
)
sa.Index(
    "ix_outbox_origin_id",
    outbox.c.origin_id,
    sqlite_where=outbox.c.origin_id.is_not(None),
    postgresql_where=outbox.c.origin_id.is_not(None),
)

# What happened to an event that did not go through at once: each attempt's
# outcome and each replay. Bounded per event (outbox.HISTORY_LIMIT).
outbox_history = sa.Table(
    "outbox_history",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column(
        "event_id",
        EventId,
        sa.ForeignKey("outbox.id", ondelete="CASCADE", onupdate="CASCADE"),
        nullable=False,
    ),
    sa.Column("at", UTCDateTime, nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=True),
    sa.Column("status_code", sa.Integer, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("actor", sa.String(255), nullable=False),  # a worker's id, or an operator
    sa.Column("detail", sa.Text, nullable=True),
    sa.CheckConstraint(
        "kind IN ('retry', 'failed', 'delivered', 'held', 'replayed')", name="kind_valid"
    ),
)
sa.Index("ix_outbox_history_event_id_id", outbox_history.c.event_id, outbox_history.c.id)
sa.Index("ix_outbox_history_kind_at", outbox_history.c.kind, outbox_history.c.at)

# A logged-in session: the encrypted cookie carries its id; logout revokes it.
sessions = sa.Table(
    "sessions",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("user_id", BigId, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=False),
    sa.Column("revoked_at", UTCDateTime, nullable=True),
    # When a process last saw it in use (None: since created_at); for the idle timeout.
    sa.Column("last_seen_at", UTCDateTime, nullable=True),
)
sa.Index("ix_sessions_user_id", sessions.c.user_id)
sa.Index("ix_sessions_expires_at", sessions.c.expires_at)

# Keys that Inngest SDKs send events with (POST /e/{key}); only a hash of each.
relay_keys = sa.Table(
    "relay_keys",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),  # SHA-256, hex
    sa.Column("created_at", UTCDateTime, nullable=False),
    # Set by the transaction that stores the key's events.
    sa.Column("last_used_at", UTCDateTime, nullable=True),
    sa.Column("revoked_at", UTCDateTime, nullable=True),
)

# Failed logins per key ("user:NAME", "ip:ADDR"), counted over a sliding window.
login_failures = sa.Table(
    "login_failures",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("key", sa.String(128), nullable=False),
    sa.Column("at", UTCDateTime, nullable=False),
)
sa.Index("ix_login_failures_key_at", login_failures.c.key, login_failures.c.at)
sa.Index("ix_login_failures_at", login_failures.c.at)
