"""The application factory. It does no I/O: resources open in cleanup contexts."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from . import auth, migrate
from .config import Settings
from .delivery.running import delivering
from .delivery.worker import DeliveryWorker
from .intake import DocumentIntake
from .keys import (
    DATABASE,
    INTAKE,
    LOGIN_THROTTLE,
    METRICS,
    PASSWORDS,
    READINESS,
    RELAY_KEYS,
    S3_CHECKER,
    SCHEMA_HEAD,
    SESSION_REGISTRY,
    SESSIONS,
    SETTINGS,
    STATUS_PORT,
    WAKE,
    WORKER,
)
from .metrics import Metrics
from .relay_keys import RelayKeys
from .storage import S3CredentialChecker
from .store import open_database
from .store.database import Database
from .web import admin, documents, events, health, openapi, relay, sessions
from .web.middlewares import request_middleware
from .web.readiness import RevisionCheck
from .web.server import AppRunner as ProblemAppRunner


def create_app(settings: Settings) -> web.Application:
    # The body limit is enforced by aiohttp too, for bodies read without
    # Content-Length (chunked); the handlers give the friendlier error first
    # (each route's own limit: the relay's batches may be larger).
    app = web.Application(
        client_max_size=max(settings.max_body_bytes, settings.relay_max_body_bytes),
        middlewares=[request_middleware],
    )
    # Sessions are aiohttp-session's encrypted cookies, read where needed
    # (auth.current_user) rather than by a middleware on every request.
    app[METRICS] = metrics = Metrics()
    app[SESSIONS] = auth.session_storage(settings, on_rejected=metrics.cookies_rejected.inc)
    app[SESSION_REGISTRY] = auth.SessionRegistry(
        check_seconds=settings.session_check_seconds, idle_seconds=settings.session_idle_seconds
    )
    app[LOGIN_THROTTLE] = auth.LoginThrottle(
        max_failures=settings.login_max_failures,
        window_seconds=settings.login_failure_window_seconds,
        slowdown_max_seconds=settings.login_slowdown_max_seconds,
    )
    app[SETTINGS] = settings
    app[S3_CHECKER] = S3CredentialChecker(
        settings.s3_bucket,
        interval_seconds=settings.s3_check_interval_seconds,
    )

    app[WAKE] = asyncio.Event()
    app[PASSWORDS] = auth.PasswordVerifier()
    app[READINESS] = RevisionCheck()

    # Cleanup runs in reverse order: the engine closes last.
    app.cleanup_ctx.append(_database)
    app.cleanup_ctx.append(_intake)
    if settings.run_worker:
        app.cleanup_ctx.append(_delivery)
    app.cleanup_ctx.append(_s3_checks)
    if settings.metrics_port is not None:
        app.cleanup_ctx.append(_metrics_port)

    app.router.add_get("/healthz", health.healthz)
    app.router.add_get("/readyz", health.readyz)
    app.router.add_post("/auth/login", sessions.login)
    app.router.add_post("/auth/logout", sessions.logout)
    app.router.add_get("/auth/me", sessions.me)
    app.router.add_get("/metrics", health.metrics)
    app.router.add_get("/openapi.json", openapi.openapi)
    app.router.add_post("/api", documents.post_document)
    app.router.add_get("/api/events/{id}", events.get_event)
    app.router.add_post("/e/{key}", relay.receive_events)
    app.router.add_get("/admin", admin.page)
    app.router.add_get("/admin/api/stats", admin.api_stats)
    app.router.add_get("/admin/api/events", admin.api_list)
    app.router.add_get("/admin/api/events/{id}", admin.api_event)
    app.router.add_post("/admin/api/replay", admin.api_replay)
    return app


def create_worker_status_app(
    db: Database, worker: DeliveryWorker, metrics: Metrics, schema_head: str
) -> web.Application:
    """/healthz, /readyz and /metrics of a worker-only process (`worker --metrics-port`)."""
    return create_status_app(db, metrics, schema_head, RevisionCheck(), worker=worker)


def create_status_app(
    db: Database,
    metrics: Metrics,
    schema_head: str,
    readiness: RevisionCheck,
    *,
    worker: DeliveryWorker | None = None,
    s3: S3CredentialChecker | None = None,
) -> web.Application:
    """/healthz, /readyz with its details, and /metrics, for a port of their own."""
    app = web.Application(middlewares=[request_middleware])
    app[DATABASE] = db
    app[METRICS] = metrics
    app[SCHEMA_HEAD] = schema_head
    app[READINESS] = readiness
    app[STATUS_PORT] = True
    if worker is not None:
        app[WORKER] = worker
    if s3 is not None:
        app[S3_CHECKER] = s3
    app.router.add_get("/healthz", health.healthz)
    app.router.add_get("/readyz", health.readyz)
    app.router.add_get("/metrics", health.metrics)
    return app


async def _database(app: web.Application) -> AsyncIterator[None]:
    # The intake's rows go through a process of their own (service.rows_process).
    db = open_database(app[SETTINGS].database_url, rows_process=True)
    await db.start()
    app[DATABASE] = db
    app[RELAY_KEYS] = RelayKeys(db, check_seconds=app[SETTINGS].relay_key_check_seconds)
    app[SCHEMA_HEAD] = await asyncio.to_thread(migrate.head_revision) or ""
    # The hash an unknown user's password is checked against, made off the loop.
    await app[PASSWORDS].prepare()
    yield
    await db.close()


async def _intake(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    intake = DocumentIntake(
        app[DATABASE],
        queue_limit=settings.write_queue_limit,
        batch_limit=settings.write_batch_limit,
        on_commit=lambda _count: app[WAKE].set(),
    )
    app[INTAKE] = intake
    await intake.start()
    yield
    await intake.close()


async def _delivery(app: web.Application) -> AsyncIterator[None]:
    async with delivering(app[DATABASE], app[SETTINGS], wake=app[WAKE], metrics=app[METRICS]) as (
        worker,
        _tasks,
    ):
        app[WORKER] = worker
        # New events go from their commit straight to this worker, unclaimed.
        app[INTAKE].hand_off_to(worker)
        yield
        app[INTAKE].hand_off_to(None)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _s3_checks(app: web.Application) -> AsyncIterator[None]:
    checker = app[S3_CHECKER]
    await checker.check_now()
    task = asyncio.create_task(checker.run(), name="s3-credential-check")
    yield
    await _cancel(task)


async def _metrics_port(app: web.Application) -> AsyncIterator[None]:
    """METRICS_PORT: /metrics and /readyz's details beside the API, on a port the
    operator keeps from the public."""
    settings = app[SETTINGS]
    assert settings.metrics_port is not None
    status = create_status_app(
        app[DATABASE],
        app[METRICS],
        app[SCHEMA_HEAD],
        app[READINESS],
        worker=app.get(WORKER),
        s3=app[S3_CHECKER],
    )
    runner = ProblemAppRunner(status, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.host, settings.metrics_port).start()
        yield
    finally:
        await runner.cleanup()
