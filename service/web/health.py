"""GET /healthz (the process serves), GET /readyz (it can do its work), GET /metrics."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import sqlalchemy as sa
from aiohttp import web

from .. import operations
from ..keys import DATABASE, METRICS, S3_CHECKER, SCHEMA_HEAD, WORKER

Check = dict[str, object]


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    checks: dict[str, Check] = {"database": await _database(request)}
    if (s3 := request.app.get(S3_CHECKER)) is not None:  # a worker-only process has none
        checks["s3"] = s3.verdict.as_json()
    checks["worker"] = _worker(request)
    ready = all(check["state"] in ("ok", "elsewhere", "degraded") for check in checks.values())
    return web.json_response(
        {"status": "ok" if ready else "unavailable", "checks": checks}, status=200 if ready else 503
    )


async def _database(request: web.Request) -> Check:
    db = request.app[DATABASE]
    head = request.app[SCHEMA_HEAD]
    try:
        async with db.engine.connect() as conn:
            current = await conn.scalar(sa.text("SELECT version_num FROM alembic_version"))
    except Exception as exc:  # what failed matters here, not the traceback
        return {"state": "unavailable", "detail": type(exc).__name__}
    if not db.writer_healthy:
        return {"state": "unavailable", "detail": "the writer thread stopped"}
    if current != head:
        return {
            "state": "unavailable",
            "detail": f"schema at revision {current}, this code needs {head}: run migrate",
        }
    if db.rows_process_lost:
        return {
            "state": "degraded",
            "revision": current,
            "detail": "the SQLite rows process ended; the writer thread writes the intake's "
            "rows (slower) until the service restarts",
        }
    return {"state": "ok", "revision": current}


def _worker(request: web.Request) -> Check:
    worker = request.app.get(WORKER)
    if worker is None:
        return {"state": "elsewhere", "detail": "serve --no-worker: worker processes deliver"}
    health = worker.health
    if not health.running:
        return {"state": "unavailable", "detail": "not running"}
    if not health.can_send:
        return {"state": "unavailable", "detail": health.detail}
    # Inngest down is not this process's fault and takes nothing from the API:
    # it accepts and keeps events, which wait. Ready, but shown.
    return {"state": "ok" if health.inngest_available else "degraded", "detail": health.detail}


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format. The outbox gauges are read from the database at
    most every few seconds, however often (or by whom) /metrics is fetched."""
    registry = request.app[METRICS]
    if registry.outbox_due(time.monotonic()):
        stats = await operations.stats(
            request.app[DATABASE], now=datetime.now(UTC), count_delivered=False
        )
        for status, count in stats.counts.items():
            if count >= 0:
                registry.rows.labels(status).set(count)
        registry.oldest_pending_age.set(stats.oldest_pending_age_seconds or 0)
    return web.Response(
        body=registry.render(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
    )
