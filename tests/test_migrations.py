"""The Alembic chain, run for real, and the SQLite connection rules."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from service import migrate
from service.models import metadata
from service.store.database import create_engine
from tests.support.service import base_env

PROJECT = Path(__file__).resolve().parent.parent


async def tables(engine) -> set[str]:
    async with engine.connect() as conn:
        return set(await conn.run_sync(lambda c: sa.inspect(c).get_table_names()))


async def test_upgrade_downgrade_upgrade(empty_db_url: str) -> None:
    engine = create_engine(empty_db_url)
    try:
        await migrate.upgrade(engine)
        assert {"users", "documents", "outbox"} <= await tables(engine)
        assert await migrate.current_revision(engine) == migrate.head_revision()
        await migrate.downgrade(engine, "base")
        assert await tables(engine) == {"alembic_version"}
        assert await migrate.current_revision(engine) is None
        await migrate.upgrade(engine)
        assert await migrate.current_revision(engine) == migrate.head_revision()
    finally:
        await engine.dispose()


async def test_migrated_schema_matches_the_models(engine) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    async with engine.connect() as conn:
        diff = await conn.run_sync(
            lambda c: compare_metadata(MigrationContext.configure(c), metadata)
        )
    assert diff == []


async def test_claim_indexes_are_partial(engine) -> None:
    query = (
        "SELECT name, sql FROM sqlite_master WHERE type='index'"
        if engine.dialect.name == "sqlite"
        else "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'outbox'"
    )
    async with engine.connect() as conn:
        sql = {name: text for name, text in await conn.exec_driver_sql(query)}
    # SQLite keeps the text as written; PostgreSQL prints its own form.
    for index, status in (
        ("ix_outbox_pending_due", "pending"),
        ("ix_outbox_sending_lease", "sending"),
    ):
        where = re.sub(r"[()]|::text", "", sql[index].split("WHERE", 1)[1]).strip()
        assert where == f"status = '{status}'", sql[index]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_sqlite_connections_are_durable_and_strict(engine) -> None:
    async with engine.connect() as conn:
        pragma = {
            name: (await conn.exec_driver_sql(f"PRAGMA {name}")).scalar()
            for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
        }
    assert pragma == {
        "journal_mode": "wal",
        "synchronous": 2,
        "foreign_keys": 1,
        "busy_timeout": 5000,
    }


async def test_foreign_keys_are_enforced(engine) -> None:
    from datetime import UTC, datetime

    from service.models import documents

    async with engine.connect() as conn:
        try:
            await conn.execute(
                documents.insert().values(
                    user_id=999, document_name="x", event_id="e", created_at=datetime.now(UTC)
                )
            )
        except sa.exc.IntegrityError as exc:
            assert "foreign key" in str(exc).lower()
        else:
            raise AssertionError("a document of an unknown user was accepted")


def test_plain_alembic_command_uses_database_url(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'a.db'}"
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(PROJECT / "alembic.ini"), "upgrade", "head"],
        env=base_env(DATABASE_URL=url),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "Running upgrade  -> 0001" in result.stderr
    assert (tmp_path / "a.db").exists()


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_postgres_outbox_autovacuum_settings(engine) -> None:
    async with engine.connect() as conn:
        options = await conn.scalar(
            sa.text("SELECT reloptions FROM pg_class WHERE relname = 'outbox'")
        )
    assert "autovacuum_vacuum_scale_factor=0.01" in options
    assert "fillfactor=90" in options


async def test_claim_query_uses_the_partial_index_with_a_large_history(db, engine) -> None:
    """100,000 delivered rows and a few pending: the claim reads the small index."""
    from datetime import UTC, datetime, timedelta

    from service import outbox as outbox_module
    from service.models import outbox

    now = datetime.now(UTC)
    rows = [
        {
            "id": f"00000000-0000-7000-8000-{i:012d}",
            "event_name": "e",
            "payload": "{}",
            "status": "delivered" if i >= 10 else "pending",
            "attempts": 1,
            "available_at": now - timedelta(seconds=i),
            "created_at": now - timedelta(seconds=i),
        }
        for i in range(100_000)
    ]
    async with engine.begin() as conn:
        await conn.execute(outbox.insert(), rows)
        if engine.dialect.name == "postgresql":
            await conn.exec_driver_sql("ANALYZE outbox")
    if engine.dialect.name == "postgresql":
        # The claim's own statement, as the store runs it.
        from service.store.postgres.outbox_sql import CLAIM

        async with engine.connect() as conn:
            raw = (await conn.get_raw_connection()).driver_connection
            result = await raw.fetch("EXPLAIN " + CLAIM, now, 100, "w", "token", now)
        plan = " ".join(row[0] for row in result)
    else:
        # The claim's due rows, as sqlite/outbox_sql.py selects them.
        sql = (
            "SELECT id FROM outbox WHERE status = :status AND available_at <= :now "
            "ORDER BY available_at LIMIT :limit"
        )
        when = now.replace(tzinfo=None).isoformat(" ")
        async with engine.connect() as conn:
            result = await conn.execute(
                sa.text("EXPLAIN QUERY PLAN " + sql),
                {"status": "pending", "now": when, "limit": 100},
            )
            plan = " ".join(str(row[-1]) for row in result)
    assert "ix_outbox_pending_due" in plan, plan
    claim = await outbox_module.claim_batch(db, owner="w", limit=100, lease_seconds=30, now=now)
    assert len(claim.events) == 10
