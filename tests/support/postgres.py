"""A real PostgreSQL server for the test session, on 127.0.0.1.

Debian ships the server with its binaries off PATH (/usr/lib/postgresql/N/bin)
and initdb refuses to run as root, so the cluster is made and run as the
``postgres`` user when we are root. TEST_POSTGRES_URL points the tests at a
server of your own instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from tests.support.net import free_port, wait_for_port


class PostgresUnavailable(RuntimeError):
    pass


@dataclass
class PostgresServer:
    host: str
    port: int
    user: str
    process: subprocess.Popen[bytes] | None = None
    data_dir: Path | None = None
    command: list[str] | None = None  # how it was started, to start it again
    admin: _AdminConnection | None = None

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+asyncpg://{self.user}@{self.host}:{self.port}/{database}"

    def create_database(self, template: str | None = None) -> str:
        """A fresh database, empty or a copy of ``template`` (a database's
        name; nobody may be connected to it); its SQLAlchemy URL."""
        name = f"t_{uuid.uuid4().hex[:16]}"
        self._admin().execute(
            f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else "")
        )
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop a test's database once it is done, connections and all: a
        session creates hundreds, each of megabytes."""
        name = make_url(url).database
        self._admin().execute_in_background(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def _admin(self) -> _AdminConnection:
        if self.admin is None:
            self.admin = _AdminConnection(self.host, self.port, self.user)
        return self.admin

    def psql(self, sql: str) -> None:
        subprocess.run(
            [_binary("psql"), "-h", self.host, "-p", str(self.port), "-U", self.user,
             "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-qc", sql],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip

    def halt(self, mode: str = "fast") -> None:
        """Shut the server down as an outage would, keeping its data for
        ``resume``: "fast" cuts the connections and checkpoints; "immediate" is
        a crash (no checkpoint: the next start replays the WAL)."""
        assert self.process is not None and self.data_dir is not None, "only one we started"
        self._close_admin()
        as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run(
            [*as_user, _binary("pg_ctl"), "stop", "-D", str(self.data_dir / "data"), "-m", mode],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        self.process.wait(timeout=30)

    def start_again(self) -> None:
        """Start the stopped server and return at once: it replays its WAL and
        accepts logins when it is done (``resume`` waits for that)."""
        assert self.command is not None
        self.process = subprocess.Popen(
            self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def resume(self) -> None:
        self.start_again()
        assert self.process is not None
        wait_for_port(self.host, self.port, timeout=60, process=self.process)
        self._wait_for_logins()

    def _wait_for_logins(self) -> None:
        deadline = time.monotonic() + 30
        while True:  # accepting connections is not yet accepting logins
            try:
                self.psql("SELECT 1")
                return
            except subprocess.CalledProcessError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _close_admin(self) -> None:
        if self.admin is not None:
            self.admin.close()
            self.admin = None

    def stop(self) -> None:
        self._close_admin()
        if self.process is not None:
            if self.process.poll() is None:
                # Immediate: the data directory is deleted next, so a shutdown
                # checkpoint would write hundreds of test databases for nothing.
                # Signalled by pg_ctl, not through runuser: runuser answers a
                # signal by sleeping 2 s before it kills the server.
                with contextlib.suppress(subprocess.SubprocessError):
                    self.halt("immediate")
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)


class _AdminConnection:
    """Connections to the server's ``postgres`` database, on an event loop of
    their own thread (callers are sync fixtures, some on a thread whose loop
    is set): CREATE and DROP DATABASE for each test without a psql process.

    A drop goes on in the background, on a connection of its own: it waits
    for the test's last backends to exit, which PostgreSQL checks every 0.1 s,
    and the next test need not wait with it."""

    def __init__(self, host: str, port: int, user: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="postgres admin", daemon=True
        )
        self._thread.start()
        self._params = {"host": host, "port": port, "user": user, "database": "postgres"}
        self._connections: dict[str, asyncpg.Connection] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._background: list[concurrent.futures.Future[None]] = []

    def execute(self, sql: str) -> None:
        self._raise_background_errors()
        self._submit("foreground", sql).result(timeout=120)

    def execute_in_background(self, sql: str) -> None:
        self._raise_background_errors()
        self._background.append(self._submit("background", sql))

    def _submit(self, lane: str, sql: str) -> concurrent.futures.Future[None]:
        return asyncio.run_coroutine_threadsafe(self._execute(lane, sql), self._loop)

    async def _execute(self, lane: str, sql: str) -> None:
        async with self._locks.setdefault(lane, asyncio.Lock()):
            if lane not in self._connections:
                self._connections[lane] = await asyncpg.connect(**self._params, timeout=30)
            await self._connections[lane].execute(sql, timeout=60)

    def _raise_background_errors(self, wait: bool = False) -> None:
        if wait:
            concurrent.futures.wait(self._background, timeout=60)
        finished = [f for f in self._background if f.done()]
        self._background = [f for f in self._background if not f.done()]
        for future in finished:
            future.result()

    def close(self) -> None:
        """Once the background's work is done (its error raised here, if any)."""
        try:
            self._raise_background_errors(wait=True)
        finally:

            async def close() -> None:
                for connection in self._connections.values():
                    await connection.close(timeout=5)

            with contextlib.suppress(Exception):  # the server may be gone already
                asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()


def _bin_dir() -> str:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    if initdb:
        return os.path.dirname(initdb)
    raise PostgresUnavailable("no PostgreSQL server binaries (apt-get install postgresql)")


def _binary(name: str) -> str:
    return shutil.which(name) or os.path.join(_bin_dir(), name)


def start_postgres(
    *, durable: bool = False, settings: dict[str, str] | None = None
) -> PostgresServer:
    """A throwaway cluster; ``durable`` keeps fsync and synchronous commits on
    (benchmarks), the tests' default turns them off for speed. ``settings``:
    more server settings, such as ``shared_preload_libraries``."""
    bin_dir = _bin_dir()
    data_dir = Path(tempfile.mkdtemp(prefix="pg-test-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(data_dir, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [*as_user, f"{bin_dir}/initdb", "-D", str(data_dir / "data"), "-A", "trust",
         "-U", "postgres", "--no-sync", "-E", "UTF8"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    port = free_port()
    command = [*as_user, f"{bin_dir}/postgres", "-D", str(data_dir / "data"), "-p", str(port),
         "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={data_dir}",
         *([] if durable else
           # Tests want speed, not crash safety of the throwaway cluster.
           ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]),
         "-c", "max_connections=200",
         *(a for item in (settings or {}).items() for a in ("-c", "=".join(item)))]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port("127.0.0.1", port, timeout=60, process=process)
    server = PostgresServer("127.0.0.1", port, "postgres", process, data_dir, command)
    server._wait_for_logins()
    return server


def connect_or_start() -> PostgresServer:
    url = os.environ.get("TEST_POSTGRES_URL")
    if url:
        parsed = make_url(url)
        host, port = parsed.host or "127.0.0.1", parsed.port or 5432
        return PostgresServer(host, port, parsed.username or "postgres")
    return start_postgres()


def postgres_copy(request: pytest.FixtureRequest, template: str | None) -> str:
    """A database of the test's own on the session's server, a copy of the
    template fixture's database (or empty), dropped when the test is done."""
    server: PostgresServer = request.getfixturevalue("postgres")
    url = server.create_database(request.getfixturevalue(template) if template else None)
    request.addfinalizer(lambda: server.drop_database(url))
    return url
