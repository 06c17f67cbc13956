"""Shared fixtures: a real SQLite file migrated by Alembic, moto's S3 server on
loopback, and the real app served by pytest-aiohttp on 127.0.0.1."""

from __future__ import annotations

import base64
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient
from argon2 import PasswordHasher
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from service import auth
from service.app import create_app
from service.config import Profile, Settings
from service.store import open_database
from service.store.database import Database
from tests.fakes.inngest import StandIn
from tests.support import npm
from tests.support.postgres import (
    PostgresServer,
    PostgresUnavailable,
    connect_or_start,
    postgres_copy,
)
from tests.support.s3 import MotoS3, start_moto
from tests.support.service import METRICS_TOKEN, base_env, call_cli, set_up_database

PASSWORD = "correct horse battery staple"
# argon2id at its lowest cost: hashing with the library's defaults takes ~0.13 s
# a time, twice per test that logs in (add the user, log in): a third of the
# suite's time. Tests marked real_password_hashing, and every service process
# the tests start, use the real cost.
FAST_HASHER = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


# Where the session's files go (tmp_path, the PostgreSQL cluster, service logs):
# RAM (/dev/shm) when the machine has it. Every SQLite commit syncs
# (synchronous=FULL) and every CREATE DATABASE writes megabytes: on a shared
# virtual disk that was half the suite's time. What the tests check is the
# same on tmpfs: a killed process, not a lost machine, is all a test can cause.
# --basetemp, or TMPDIR set to somewhere else, chooses otherwise.
RAM_DIRECTORY = "/dev/shm"


def pytest_configure(config: pytest.Config) -> None:
    chosen = config.option.basetemp or os.environ.get("TMPDIR")
    if not chosen and os.path.isdir(RAM_DIRECTORY) and os.access(RAM_DIRECTORY, os.W_OK):
        tempfile.tempdir = RAM_DIRECTORY


def pytest_collection_finish(session: pytest.Session) -> None:
    npm.start_if_needed(session)


def pytest_sessionfinish(session: pytest.Session) -> None:
    npm.stop(session)


@pytest.fixture(autouse=True)
def _fast_password_hashing(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.get_closest_marker("real_password_hashing") is None:
        monkeypatch.setattr(auth, "_hasher", lambda: FAST_HASHER)


@pytest.fixture(autouse=True)
def _forget_apps() -> Iterator[None]:
    """aiohttp caches each (handler, app) pair's middleware chain in a module-level
    LRU of 1024 entries, which keeps every test's app alive, and with it its
    engines, threads and boto3 client: gigabytes over the suite, and collector
    pauses of seconds. A service has one app; the suite makes hundreds."""
    yield
    aiohttp.web_app._cached_build_middleware.cache_clear()


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    server = start_moto()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, moto_s3: MotoS3, tmp_path: Path) -> MotoS3:
    """Point boto3's standard configuration at moto, with valid keys."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config-none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials-none"))
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_s3.endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto_s3.app_keys.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto_s3.app_keys.secret_access_key)
    return moto_s3


@pytest_asyncio.fixture
async def inngest(aiohttp_server) -> StandIn:
    """The stand-in Inngest, served on 127.0.0.1 (its URL in ``base_url``)."""
    stand_in = StandIn()
    server = await aiohttp_server(stand_in.app())
    stand_in.base_url = str(server.make_url("")).rstrip("/")  # type: ignore[attr-defined]
    return stand_in


@pytest.fixture
def service_env(tmp_path: Path, moto_s3: MotoS3, sqlite_with_user: Path) -> dict[str, str]:
    """Production settings for a real service process: migrated SQLite file, user alice."""
    database = tmp_path / "service.db"
    shutil.copyfile(sqlite_with_user, database)
    return base_env(
        DATABASE_URL=f"sqlite+aiosqlite:///{database}",
        SESSION_SECRET=base64.urlsafe_b64encode(os.urandom(32)).decode(),
        S3_BUCKET=moto_s3.bucket,
        AWS_ENDPOINT_URL_S3=moto_s3.endpoint,
        AWS_ACCESS_KEY_ID=moto_s3.app_keys.access_key_id,
        AWS_SECRET_ACCESS_KEY=moto_s3.app_keys.secret_access_key,
        AWS_DEFAULT_REGION="us-east-1",
        INNGEST_EVENT_KEY="test-event-key",
        INNGEST_BASE_URL="http://127.0.0.1:9",  # nothing listens; tests point it elsewhere
        LOG_LEVEL="WARNING",
        # Plain HTTP on loopback: a client does not send Secure cookies back.
        SESSION_COOKIE_SECURE="false",
        METRICS_TOKEN=METRICS_TOKEN,
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def any_service_env(
    request: pytest.FixtureRequest, service_env: dict[str, str]
) -> Iterator[dict[str, str]]:
    """``service_env`` on a SQLite file, then on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield service_env
        return
    yield {**service_env, "DATABASE_URL": postgres_copy(request, "postgres_with_user")}


# Templates: each test's database is a copy of one set up once per session by
# `migrate` (and `users add` for the service processes' user), run in-process,
# instead of a migration per test (hundreds of them) and two processes per
# service test. tests/test_migrations.py migrates empty databases;
# tests/test_cli.py runs those commands as processes.


@pytest.fixture(scope="session")
def sqlite_migrated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template-migrated") / "outbox.db"
    migrated = call_cli("migrate", env=base_env(DATABASE_URL=sqlite_url(path)), cwd=path.parent)
    assert migrated.returncode == 0, migrated.stderr
    return _settled(path)


@pytest.fixture(scope="session")
def sqlite_with_user(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template-user") / "service.db"
    set_up_database(sqlite_url(path), cwd=path.parent)
    return _settled(path)


def _settled(path: Path) -> Path:
    """A SQLite template is copied as one file: nothing may be left in a WAL."""
    assert not Path(f"{path}-wal").exists(), "the template's last connection did not checkpoint"
    return path


@pytest.fixture(scope="session")
def postgres_migrated(postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> str:
    url = postgres.create_database()
    cwd = tmp_path_factory.mktemp("template-pg")
    migrated = call_cli("migrate", env=base_env(DATABASE_URL=url), cwd=cwd)
    assert migrated.returncode == 0, migrated.stderr
    return make_url(url).database  # type: ignore[return-value]


@pytest.fixture(scope="session")
def postgres_with_user(postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> str:
    url = postgres.create_database()
    set_up_database(url, cwd=tmp_path_factory.mktemp("template-pg-user"))
    return make_url(url).database  # type: ignore[return-value]


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    try:
        server = connect_or_start()
    except PostgresUnavailable as exc:
        if os.environ.get("CI"):
            raise  # CI must run the PostgreSQL half of the suite, never skip it
        pytest.skip(f"PostgreSQL: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Every test that touches the database runs on both: a SQLite file, and a
    fresh database on a real PostgreSQL server; migrated (a copy of a template
    migrated by Alembic)."""
    if request.param == "sqlite":
        path = tmp_path / "outbox.db"
        shutil.copyfile(request.getfixturevalue("sqlite_migrated"), path)
        return sqlite_url(path)
    return postgres_copy(request, "postgres_migrated")


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """``db_url`` before any migration: no table at all."""
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "empty.db")
    return postgres_copy(request, None)


@pytest_asyncio.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    async with open_database(db_url) as database:
        yield database


@pytest.fixture
def engine(db: Database) -> AsyncEngine:
    """For reading what the service wrote."""
    return db.engine


@pytest.fixture
def settings(db_url: str, aws_env: MotoS3) -> Settings:
    return Settings(
        profile=Profile.PRODUCTION,
        database_url=db_url,
        session_secret=os.urandom(32),
        # The tests speak plain HTTP, where a client does not send Secure cookies back.
        session_cookie_secure=False,
        metrics_token=METRICS_TOKEN,
        s3_bucket=aws_env.bucket,
        inngest_event_key="test-event-key",
        # API tests read the rows as the API left them; delivery tests turn it on.
        run_worker=False,
    )


@pytest_asyncio.fixture
async def user(db: Database) -> auth.User:
    return await auth.create_user(db, "alice", PASSWORD)


@pytest_asyncio.fixture
async def client(aiohttp_client, settings: Settings, engine: AsyncEngine) -> TestClient:
    return await aiohttp_client(create_app(settings))


@pytest.fixture
def alice_on(aiohttp_client, settings: Settings, engine: AsyncEngine, user: auth.User):
    """Serve the app with some settings changed, logged in as alice."""

    async def serve(**changes: object) -> TestClient:
        client = await aiohttp_client(create_app(settings.replace(**changes)))
        response = await client.post(
            "/auth/login", json={"username": "alice", "password": PASSWORD}
        )
        assert response.status == 200, await response.text()
        return client

    return serve


@pytest_asyncio.fixture
async def logged_in(client: TestClient, user: auth.User) -> TestClient:
    response = await client.post("/auth/login", json={"username": "alice", "password": PASSWORD})
    assert response.status == 200, await response.text()
    return client


@pytest.fixture
def delivery_settings(settings: Settings, inngest: StandIn) -> Settings:
    return settings.replace(
        inngest_base_url=inngest.base_url,  # type: ignore[attr-defined]
        inngest_event_key=inngest.event_key,
        # Retries land seconds ahead, so one drain does not retry at once;
        # tests move the clock (``later``) to make them due.
        retry_base_seconds=10,
        retry_cap_seconds=10,
        retry_max_attempts=5,
        inngest_timeout_seconds=2.0,
        worker_poll_seconds=30.0,
        worker_lease_seconds=30.0,
    )


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
