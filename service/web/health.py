"""GET /healthz (the process serves), GET /readyz (it can do its work), GET /metrics.

/readyz tells anyone whether each check passes, and only that. What is behind
a state (the schema revision, the bucket, Inngest's last error) goes to an
admin's session, to the holder of METRICS_TOKEN, and to the metrics port
(METRICS_PORT, or a worker's --metrics-port), which the operator keeps private.
"""

from __future__ import annotations

import hmac
import logging
import time
from datetime import UTC, datetime

from aiohttp import hdrs, web

from .. import operations
from ..keys import (
    DATABASE,
    METRICS,
    READINESS,
    S3_CHECKER,
    SCHEMA_HEAD,
    SETTINGS,
    STATUS_PORT,
    WORKER,
)
from .admin import is_admin
from .problems import Problem

log = logging.getLogger(__name__)

Check = dict[str, object]
READY_STATES = frozenset({"ok", "elsewhere", "degraded"})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    checks: dict[str, Check] = {"database": await _database(request)}
    if (s3 := request.app.get(S3_CHECKER)) is not None:  # a worker-only process has none
        checks["s3"] = s3.verdict.as_json()
    checks["worker"] = _worker(request)
    ready = all(check["state"] in READY_STATES for check in checks.values())
    if not await _may_see_details(request):
        checks = {name: {"state": _public_state(check)} for name, check in checks.items()}
    return web.json_response(
        {"status": "ok" if ready else "unavailable", "checks": checks}, status=200 if ready else 503
    )


def _public_state(check: Check) -> str:
    state = str(check["state"])
    return state if state in READY_STATES else "unavailable"


async def _may_see_details(request: web.Request) -> bool:
    if request.app.get(STATUS_PORT, False) or _bearer_matches(request):
        return True
    if hdrs.COOKIE not in request.headers:
        return False  # the common anonymous probe: no session to look up
    try:
        return await is_admin(request)
    except Exception:  # the database is down: the answer says so, without details
        log.debug("no admin check for /readyz", exc_info=True)
        return False


def _bearer_matches(request: web.Request) -> bool:
    settings = request.app.get(SETTINGS)
    if settings is None or settings.metrics_token is None:
        return False
    scheme, _, token = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    # Constant time: the comparison says nothing of how much of a guess was right.
    return hmac.compare_digest(token.strip().encode(), settings.metrics_token.encode())


async def _database(request: web.Request) -> Check:
    db = request.app[DATABASE]
    head = request.app[SCHEMA_HEAD]
    current, error = await request.app[READINESS].read(db)
    if error is not None:
        return {"state": "unavailable", "detail": error}
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
    _require_metrics_access(request)
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


def _require_metrics_access(request: web.Request) -> None:
    """On the service's own port: the bearer token if there is one; nothing if
    the metrics have a port of their own; else open (start-up warns)."""
    settings = request.app.get(SETTINGS)
    if request.app.get(STATUS_PORT, False) or settings is None:
        return
    if settings.metrics_token is not None:
        if not _bearer_matches(request):
            raise Problem(
                401,
                "invalid_token",
                "Metrics need a token",
                "Send Authorization: Bearer with the METRICS_TOKEN.",
                headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
            )
        return
    if settings.metrics_port is not None:
        raise Problem(404, "not_found", "Not found", "Metrics are served on the metrics port.")
