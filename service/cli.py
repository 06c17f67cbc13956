"""The `inngest-outbox` command: serve, worker, migrate, users, and the operators' commands."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import getpass
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from sqlalchemy.exc import DBAPIError

from . import auth, cli_outbox, devprofile, migrate, relay_keys
from .config import ConfigError, Profile, Settings
from .logs import configure_logging
from .operations import InvalidArgument
from .store import open_database
from .store.database import Database, create_engine
from .web.middlewares import RequestIdAccessLogger
from .web.server import AppRunner as ProblemAppRunner

log = logging.getLogger("service")

EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env(profile=Profile.DEV if getattr(args, "dev", False) else None)
    except ConfigError as exc:
        parser.exit(EXIT_USAGE, f"inngest-outbox: configuration error: {exc}\n")
    configure_logging(settings.log_level, settings.log_format)
    try:
        return int(args.func(args, settings) or 0)
    except ConfigError as exc:
        parser.exit(EXIT_USAGE, f"inngest-outbox: configuration error: {exc}\n")
    except InvalidArgument as exc:
        parser.exit(EXIT_USAGE, f"inngest-outbox: {exc}\n")
    except DBAPIError as exc:
        # The driver's own words (parameters are hidden by the engine).
        message = str(exc.orig).splitlines()[0] if exc.orig else type(exc).__name__
        hint = " (has `inngest-outbox migrate` been run?)" if "no such table" in message else ""
        print(f"inngest-outbox: database error: {message}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inngest-outbox",
        description="An aiohttp service with a durable transactional outbox for Inngest. "
        "Configuration comes from environment variables (see README).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="serve the HTTP API")
    serve.add_argument(
        "--dev",
        action="store_true",
        help="local dev profile: keep a generated session secret in .inngest-outbox/, run a "
        "local S3 stand-in when S3_BUCKET is unset, and apply migrations",
    )
    serve.add_argument("--host", help="listen address (default: $HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default: $PORT or 8080)")
    serve.add_argument(
        "--no-worker",
        action="store_true",
        help="serve the API only; run `inngest-outbox worker` processes to deliver",
    )
    serve.set_defaults(func=cmd_serve)

    worker = commands.add_parser(
        "worker",
        help="deliver the outbox to Inngest (no HTTP API); several may run at once",
    )
    worker.add_argument(
        "--burst",
        action="store_true",
        help="deliver what is due now, then exit (exit status 1 if anything is still pending)",
    )
    worker.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve /metrics, /healthz and /readyz on this port (on $HOST, default 127.0.0.1)",
    )
    worker.set_defaults(func=cmd_worker)

    mig = commands.add_parser("migrate", help="apply the database migrations")
    mig.add_argument("revision", nargs="?", default="head", help="target revision (default head)")
    mig.set_defaults(func=cmd_migrate)

    users = commands.add_parser("users", help="manage users")
    user_commands = users.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    add = user_commands.add_parser(
        "add",
        help="create a user; the password is prompted for, or read from the first line of "
        "stdin when stdin is not a terminal",
    )
    add.add_argument("username")
    add.add_argument("--admin", action="store_true", help="make the user an administrator")
    add.set_defaults(func=cmd_users_add)
    passwd = user_commands.add_parser(
        "passwd",
        help="set a user's password (read as for add) and end the user's sessions",
    )
    passwd.add_argument("username")
    passwd.set_defaults(func=cmd_users_passwd)
    disable = user_commands.add_parser(
        "disable", help="refuse the user's logins and end the user's sessions"
    )
    disable.add_argument("username")
    disable.set_defaults(func=cmd_users_disable, disabled=True)
    enable = user_commands.add_parser("enable", help="let a disabled user log in again")
    enable.add_argument("username")
    enable.set_defaults(func=cmd_users_disable, disabled=False)
    user_sessions = user_commands.add_parser("sessions", help="a user's sessions")
    session_commands = user_sessions.add_subparsers(
        dest="sessions_command", required=True, metavar="ACTION"
    )
    revoke = session_commands.add_parser(
        "revoke",
        help="log the user out everywhere: every process refuses the sessions within "
        "SESSION_CHECK_SECONDS",
    )
    revoke.add_argument("username")
    revoke.set_defaults(func=cmd_users_sessions_revoke)

    keys = commands.add_parser(
        "keys", help="manage relay keys (Inngest SDKs send events to POST /e/{key})"
    )
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    key_add = key_commands.add_parser(
        "add", help="create a key; it is printed once, alone on the last line (only a hash is kept)"
    )
    key_add.add_argument("name", help="the key's name: 1 to 64 letters, digits, '.', '_', '-'")
    key_add.set_defaults(func=cmd_keys_add)
    key_list = key_commands.add_parser("list", help="the keys' names and use (never the keys)")
    key_list.set_defaults(func=cmd_keys_list)
    key_revoke = key_commands.add_parser(
        "revoke",
        help="refuse a key: every process refuses it within RELAY_KEY_CHECK_SECONDS",
    )
    key_revoke.add_argument("name")
    key_revoke.set_defaults(func=cmd_keys_revoke)

    cli_outbox.add_commands(commands)
    return parser


def _exit_quietly_on_sigterm() -> None:
    """Until the service installs its own handlers, SIGTERM ends start-up cleanly."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    _exit_quietly_on_sigterm()
    if args.host:
        settings = settings.replace(host=args.host)
    if args.port is not None:
        settings = settings.replace(port=args.port)
    if args.no_worker:
        settings = settings.replace(run_worker=False)
    if settings.profile is Profile.DEV:
        settings = devprofile.dev_settings(settings)
        asyncio.run(_migrate(settings.database_url, "head"))
    else:
        settings.check_production()
        if settings.run_worker:
            settings.check_worker()
        migrate.require_schema_at_head(settings.database_url)
    return asyncio.run(_serve(settings))


async def _serve(settings: Settings) -> int:
    from .app import create_app

    received = _catch_signals()
    # No access log unless asked for: a log line per request costs more than
    # a tenth of this service's throughput; /metrics is the cheaper view.
    runner = ProblemAppRunner(
        create_app(settings),
        handle_signals=False,
        shutdown_timeout=10,
        # aiohttp has no timer of its own for a request head that trickles in:
        # its keep-alive timer, armed when a connection opens and after every
        # answer, closes a connection still waiting for a whole request.
        keepalive_timeout=settings.header_timeout_seconds,
        access_log=web_log_access_logger() if settings.access_log else None,
        access_log_class=RequestIdAccessLogger,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        tune_garbage_collector()
        shorten_switch_interval()
        for warning in settings.security_warnings():
            log.warning("%s", warning)
        if settings.metrics_port is not None:
            log.info(
                "serving /metrics and /readyz's details on http://%s:%d",
                settings.host,
                settings.metrics_port,
            )
        log.info(
            "serving on http://%s:%d (profile %s, worker %s)",
            settings.host,
            settings.port,
            settings.profile,
            "on" if settings.run_worker else "off",
        )
        signum = await received
        log.info("received %s: shutting down (send it again to exit at once)", signum.name)
    finally:
        # Handlers finish, the writer commits what is queued, the worker lets
        # in-flight sends finish and releases what it did not send.
        await runner.cleanup()
    return 0


def web_log_access_logger() -> logging.Logger:
    return logging.getLogger("aiohttp.access")


def tune_garbage_collector() -> None:
    """Keep the cycle collector's pauses out of the requests' latency.

    Everything alive once the app has started (modules, SQLAlchemy's caches,
    the app) is moved out of the collector's reach, and collections run less
    often: full collections of the whole heap were the service's p99 (tens of
    ms at a few thousand requests per second).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


# How long a thread waiting for the GIL lets the thread holding it run on
# before asking for it (Python's default: 5 ms).
SWITCH_INTERVAL_SECONDS = 0.0005


def shorten_switch_interval() -> None:
    """Let the database's writer thread take the GIL back from a busy event loop
    within half a millisecond instead of five.

    The SQLite writer releases the GIL for each statement and needs it back to
    answer the requests the statement committed; while the event loop is busy
    it waited up to the whole interval, and a whole wave of requests with it.
    Measured with bench.compare (30 rounds against the default): median 1.046
    of the default's throughput, 20 rounds of 30 faster.
    """
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    _exit_quietly_on_sigterm()
    if settings.profile is Profile.DEV:
        settings = devprofile.dev_worker_settings(settings)
    settings.check_worker()
    migrate.require_schema_at_head(settings.database_url)
    return asyncio.run(_work(settings, burst=args.burst, metrics_port=args.metrics_port))


async def _work(settings: Settings, *, burst: bool, metrics_port: int | None = None) -> int:
    from .app import create_worker_status_app
    from .delivery.running import delivering
    from .metrics import Metrics

    received = _catch_signals()
    db = open_database(settings.database_url)
    await db.start()
    try:
        if burst:
            return await _burst(db, settings, received)
        metrics = Metrics()
        async with delivering(db, settings, wake=asyncio.Event(), metrics=metrics) as (
            worker,
            tasks,
        ):
            status = None
            if metrics_port is not None:
                head = await asyncio.to_thread(migrate.head_revision) or ""
                status = ProblemAppRunner(
                    create_worker_status_app(db, worker, metrics, head), access_log=None
                )
                await status.setup()
                await web.TCPSite(status, settings.host, metrics_port).start()
                log.info("serving /metrics on http://%s:%d", settings.host, metrics_port)
            tune_garbage_collector()
            shorten_switch_interval()
            log.info("worker %s delivering to %s", worker.owner, settings.inngest_base_url)
            ended = asyncio.ensure_future(tasks.ended.wait())
            try:
                signum = await _first_of(received, ended)
            finally:
                ended.cancel()
            if signum is not None:
                log.info("received %s: stopping (send it again to exit at once)", signum.name)
            if status is not None:
                await status.cleanup()
    finally:
        await db.close()
    return 0


async def _burst(db: Database, settings: Settings, received: asyncio.Future[signal.Signals]) -> int:
    """Deliver what is due now, then exit: 1 if anything is left for later."""
    from .delivery.running import inngest_client, inngest_session
    from .delivery.worker import DeliveryWorker

    async with inngest_session(settings) as session:
        worker = DeliveryWorker(db, inngest_client(settings, session), settings)
        drain = asyncio.create_task(worker.drain_once())
        if await _first_of(received, drain) is not None:
            log.info("stopping the burst: what was claimed and not sent is released")
            await worker.stop()
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain
            return 1
        stats = drain.result()
        print(f"delivered {stats.delivered}, rescheduled {stats.retried}, failed {stats.failed}")
        return 1 if stats.retried or stats.released else 0


def _catch_signals() -> asyncio.Future[signal.Signals]:
    """SIGTERM or SIGINT resolve the future; a second one exits the process at once.

    Installed before anything is served, so an early signal is never the
    default (immediate) one. Exiting at once skips cleanup on purpose: leased
    rows come back when their lease expires, and nothing acknowledged is lost.
    """
    loop = asyncio.get_running_loop()
    received: asyncio.Future[signal.Signals] = loop.create_future()

    def on_signal(signum: signal.Signals) -> None:
        if received.done():
            os._exit(128 + signum)
        received.set_result(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    return received


async def _first_of(
    received: asyncio.Future[signal.Signals], task: asyncio.Future[Any] | None = None
) -> signal.Signals | None:
    waiters: set[asyncio.Future[object]] = {received}  # type: ignore[arg-type]
    if task is not None:
        waiters.add(task)  # type: ignore[arg-type]
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    return received.result() if received.done() else None


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    asyncio.run(_migrate(settings.database_url, args.revision))
    print(f"database migrated to {args.revision}")
    return 0


def cmd_users_add(args: argparse.Namespace, settings: Settings) -> int:
    try:
        auth.validate_username(args.username)
        password = _read_password()
        auth.validate_password(password)
    except auth.InvalidUserInput as exc:
        print(f"inngest-outbox: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        user = asyncio.run(_add_user(settings.database_url, args.username, password, args.admin))
    except auth.UserExists:
        print(f"inngest-outbox: user {args.username!r} already exists", file=sys.stderr)
        return 1
    print(f"created user {user.username!r} (id {user.id}{', admin' if user.is_admin else ''})")
    return 0


def cmd_users_passwd(args: argparse.Namespace, settings: Settings) -> int:
    try:
        password = _read_password()
        auth.validate_password(password)
    except auth.InvalidUserInput as exc:
        print(f"inngest-outbox: {exc}", file=sys.stderr)
        return EXIT_USAGE
    ended = _on_user(
        settings, args.username, lambda db: auth.set_password(db, args.username, password)
    )
    if ended is None:
        return 1
    print(f"changed the password of {args.username!r}; {_sessions(ended)} ended")
    return 0


def cmd_users_disable(args: argparse.Namespace, settings: Settings) -> int:
    name = args.username
    ended = _on_user(settings, name, lambda db: auth.set_disabled(db, name, args.disabled))
    if ended is None:
        return 1
    if args.disabled:
        print(f"disabled {name!r}; {_sessions(ended)} ended")
    else:
        print(f"enabled {name!r}")
    return 0


def cmd_users_sessions_revoke(args: argparse.Namespace, settings: Settings) -> int:
    ended = _on_user(settings, args.username, lambda db: auth.revoke_sessions(db, args.username))
    if ended is None:
        return 1
    print(
        f"revoked {_sessions(ended)} of {args.username!r}; every process refuses them within "
        f"SESSION_CHECK_SECONDS ({settings.session_check_seconds:g} s)"
    )
    return 0


def _sessions(count: int) -> str:
    return f"{count} session{'' if count == 1 else 's'}"


def _on_user(
    settings: Settings, username: str, change: Callable[[Database], Awaitable[int]]
) -> int | None:
    """``change`` on the database; None (said on stderr) when there is no such user."""

    async def run() -> int:
        async with open_database(settings.database_url) as db:
            return await change(db)

    try:
        return asyncio.run(run())
    except auth.UnknownUser:
        print(f"inngest-outbox: no user {username!r}", file=sys.stderr)
        return None


def _on_keys(settings: Settings, change: Callable[[Database], Awaitable[Any]]) -> Any:
    migrate.require_schema_at_head(settings.database_url)

    async def run() -> Any:
        async with open_database(settings.database_url) as db:
            return await change(db)

    return asyncio.run(run())


def cmd_keys_add(args: argparse.Namespace, settings: Settings) -> int:
    try:
        relay_keys.validate_name(args.name)
        key = _on_keys(
            settings, lambda db: relay_keys.add_key(db, args.name, now=datetime.now(UTC))
        )
    except relay_keys.InvalidKeyName as exc:
        print(f"inngest-outbox: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except relay_keys.KeyExists:
        print(f"inngest-outbox: a key named {args.name!r} exists already", file=sys.stderr)
        return 1
    print(
        f"created relay key {args.name!r}. It is shown only now: set it as INNGEST_EVENT_KEY "
        "in the app, and INNGEST_EVENT_API_BASE_URL to this service's URL."
    )
    print(key)
    return 0


def cmd_keys_list(args: argparse.Namespace, settings: Settings) -> int:
    keys = _on_keys(settings, relay_keys.list_keys)
    if not keys:
        print("(no relay keys)")
        return 0
    rows = [["NAME", "CREATED", "LAST USED", "REVOKED"]] + [
        [
            k.name,
            _when(k.created_at),
            _when(k.last_used_at) if k.last_used_at else "never",
            _when(k.revoked_at) if k.revoked_at else "-",
        ]
        for k in keys
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_keys_revoke(args: argparse.Namespace, settings: Settings) -> int:
    try:
        revoked = _on_keys(
            settings, lambda db: relay_keys.revoke_key(db, args.name, now=datetime.now(UTC))
        )
    except relay_keys.UnknownKey:
        print(f"inngest-outbox: no relay key {args.name!r}", file=sys.stderr)
        return 1
    if not revoked:
        print(f"relay key {args.name!r} was revoked already")
        return 0
    print(
        f"revoked relay key {args.name!r}; every process refuses it within "
        f"RELAY_KEY_CHECK_SECONDS ({settings.relay_key_check_seconds:g} s)"
    )
    return 0


def _when(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _read_password() -> str:
    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Repeat password: ") != password:
            raise auth.InvalidUserInput("the passwords do not match")
        return password
    return sys.stdin.readline().rstrip("\r\n")


async def _add_user(url: str, username: str, password: str, is_admin: bool) -> auth.User:
    async with open_database(url) as db:
        return await auth.create_user(db, username, password, is_admin=is_admin)


async def _migrate(url: str, revision: str) -> None:
    engine = create_engine(url)
    try:
        await migrate.upgrade(engine, revision)
    finally:
        await engine.dispose()
