"""The real `inngest-outbox` command, run as a separate process."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from argon2 import PasswordHasher

from tests.support.net import free_port, wait_for_port


def base_env(**extra: str) -> dict[str, str]:
    """The test process's environment without anything the service reads."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "INNGEST_", "SESSION_", "S3_"))
        and k not in {"DATABASE_URL", "HOST", "PORT", "LOG_LEVEL"}
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_cli(
    *args: str, env: dict[str, str], cwd: Path, input: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        env=env,
        cwd=cwd,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def call_cli(
    *args: str, env: dict[str, str], cwd: Path, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``run_cli`` without the process: the command's ``main()`` in this one,
    with the same environment, working directory, stdin, stdout and stderr,
    and its exit status. A Python start-up with the service's imports costs
    about a second; tests of what a command does use this, the tests of the
    command line as such (tests/test_cli.py) start the real process.

    It swaps process-wide state for the call (os.environ, the working
    directory, sys.std*, the root logger), so calls must not overlap; main()
    runs on a thread of its own because it calls asyncio.run(), which may
    not run on a thread whose loop is running or set (an async test's)."""
    from service import cli

    stdout, stderr = io.StringIO(), io.StringIO()
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["code"] = cli.main(list(args))
        except SystemExit as exc:  # argparse's exits and parser.exit()
            outcome["code"] = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        except BaseException as exc:  # raised again on the caller's thread
            outcome["error"] = exc

    saved_logging = [(logger, logger.level, logger.handlers[:]) for logger in _cli_loggers()]
    saved_environ = dict(os.environ)
    saved_cwd = os.getcwd()
    try:
        os.environ.clear()
        os.environ.update(env)
        os.chdir(cwd)
        with (
            _swapped_stdin(io.StringIO(input or "")),
            contextlib.redirect_stdout(stdout),
            contextlib.redirect_stderr(stderr),
        ):
            thread = threading.Thread(target=run, name="call_cli")
            thread.start()
            thread.join()
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_environ)
        for logger, level, handlers in saved_logging:
            logger.setLevel(level)
            logger.handlers[:] = handlers
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return subprocess.CompletedProcess(
        ["inngest-outbox", *args], int(outcome["code"] or 0), stdout.getvalue(), stderr.getvalue()
    )


def _cli_loggers() -> list[logging.Logger]:
    """The loggers service.logs.configure_logging sets: the root and the credential loggers."""
    from service.logs import CREDENTIAL_LOGGERS

    return [logging.getLogger(), *(logging.getLogger(name) for name in CREDENTIAL_LOGGERS)]


@contextlib.contextmanager
def _swapped_stdin(stdin: io.StringIO):  # type: ignore[no-untyped-def]
    saved, sys.stdin = sys.stdin, stdin
    try:
        yield
    finally:
        sys.stdin = saved


def set_up_database(url: str, cwd: Path) -> None:
    """What an operator does before the first `serve`: `migrate`, then
    `users add` USER, hashed at the service's real argon2 cost (the tests'
    fast hasher is for their in-process apps; service processes verify this)."""
    from service import auth

    env = base_env(DATABASE_URL=url, LOG_LEVEL="WARNING")
    migrated = call_cli("migrate", env=env, cwd=cwd)
    assert migrated.returncode == 0, migrated.stderr
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(auth, "_hasher", PasswordHasher)
        added = call_cli("users", "add", USER, env=env, cwd=cwd, input=PASSWORD + "\n")
    assert added.returncode == 0, added.stderr


class ServiceProcess:
    def __init__(self, args: list[str], *, env: dict[str, str], cwd: Path) -> None:
        self.port = free_port()
        self.log_path = cwd / f"service-{self.port}.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service", *args],
            env={**env, "HOST": "127.0.0.1", "PORT": str(self.port)},
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 60) -> ServiceProcess:
        try:
            wait_for_port("127.0.0.1", self.port, timeout=timeout, process=self.process)
        except (RuntimeError, TimeoutError) as exc:
            raise AssertionError(f"{exc}\n--- service log ---\n{self.log()}") from None
        return self

    async def started(self, wait_seconds: float = 60) -> ServiceProcess:
        """wait_ready() off the event loop, so in-process servers keep answering."""
        return await asyncio.to_thread(self.wait_ready, wait_seconds)

    async def logged(self, text: str, wait_seconds: float = 20) -> None:
        """Wait until the process has logged ``text`` (it offers no other signal)."""
        async with asyncio.timeout(wait_seconds):
            while text not in self.log():
                if self.process.poll() is not None:
                    raise AssertionError(f"exited before logging {text!r}:\n{self.log()}")
                await asyncio.sleep(0.02)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: no cleanup, no flush; what is on disk is all that survives."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        self._log.close()

    def stop(self, timeout: float = 20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


USER = "alice"
PASSWORD = "a long password"
# What an operator's monitoring sends for /metrics and /readyz's details.
METRICS_TOKEN = "metrics-token-of-the-tests-5c2e0a"
OPERATOR = {"Authorization": f"Bearer {METRICS_TOKEN}"}


def http_session(**kwargs: object) -> aiohttp.ClientSession:
    # unsafe=True: keep cookies set by 127.0.0.1 (aiohttp drops IP hosts' by default).
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True), **kwargs)  # type: ignore[arg-type]


async def log_in(http: aiohttp.ClientSession, url: str) -> None:
    response = await http.post(f"{url}/auth/login", json={"username": USER, "password": PASSWORD})
    assert response.status == 200, await response.text()


async def query(env: dict[str, str], sql: str) -> list[tuple[object, ...]]:
    """Read what a service process wrote, on whichever database it used."""
    import sqlalchemy as sa

    from service.store.database import create_engine

    engine = create_engine(env["DATABASE_URL"])
    try:
        async with engine.connect() as conn:
            return [tuple(row) for row in await conn.execute(sa.text(sql))]
    finally:
        await engine.dispose()


async def poll_until(
    check: Callable[[], Awaitable[bool]], *, wait_seconds: float = 30, interval: float = 0.05
) -> None:
    """For state another process writes to the database: no event crosses the
    process boundary, so read until it shows (or the timeout fails the test)."""
    async with asyncio.timeout(wait_seconds):
        while not await check():  # noqa: ASYNC110
            await asyncio.sleep(interval)
