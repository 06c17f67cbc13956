"""Run the Alembic revisions in migrations/ on the service's own engine."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import NullPool

from .config import ConfigError
from .store.database import create_engine

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ALEMBIC_INI = PROJECT_ROOT / "alembic.ini"


def alembic_config() -> Config:
    if not ALEMBIC_INI.is_file():
        raise RuntimeError(
            f"{ALEMBIC_INI} not found: install the project from its checkout (pip install -e .)"
        )
    config = Config(str(ALEMBIC_INI))
    config.attributes["skip_logging_config"] = True
    return config


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    await _migrate(engine, "upgrade", revision)


async def downgrade(engine: AsyncEngine, revision: str) -> None:
    await _migrate(engine, "downgrade", revision)


async def _migrate(engine: AsyncEngine, action: str, revision: str) -> None:
    # An engine of its own: on SQLite, foreign keys are off while batch mode
    # copies and drops tables, and checked as a whole before the commit.
    own = create_engine(
        engine.url.render_as_string(hide_password=False), foreign_keys=False, poolclass=NullPool
    )
    try:
        async with own.begin() as conn:
            await conn.run_sync(_run, action, revision)
            if own.dialect.name == "sqlite":
                broken = (await conn.exec_driver_sql("PRAGMA foreign_key_check")).all()
                if broken:
                    raise RuntimeError(f"migration left dangling foreign keys: {broken[:5]}")
    finally:
        await own.dispose()


async def current_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as conn:
        return await conn.run_sync(_read_revision)


def _read_revision(connection: Connection) -> str | None:
    # Alembic announces its context at INFO on every configure: noise for a
    # read that every operator command makes first.
    migration_log = logging.getLogger("alembic.runtime.migration")
    level = migration_log.level
    migration_log.setLevel(logging.WARNING)
    try:
        return MigrationContext.configure(connection).get_current_revision()
    finally:
        migration_log.setLevel(level)


def _run(connection: Connection, action: str, revision: str) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    getattr(command, action)(config, revision)


def require_schema_at_head(url: str) -> None:
    """Production serves only a migrated database; it never creates one."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        if not os.path.exists(parsed.database):
            raise ConfigError(
                f"the database file {parsed.database} does not exist: "
                "run `inngest-outbox migrate` first"
            )
    current = asyncio.run(_current_revision(url))
    head = head_revision()
    if current != head:
        raise ConfigError(
            f"the database schema is at revision {current or 'none'}, not {head}: "
            "run `inngest-outbox migrate` first"
        )


async def _current_revision(url: str) -> str | None:
    engine = create_engine(url)
    try:
        return await current_revision(engine)
    finally:
        await engine.dispose()
