"""GET /healthz (the process serves) and GET /readyz (it can accept work)."""

from __future__ import annotations

import sqlalchemy as sa
from aiohttp import web

from ..keys import DATABASE, S3_CHECKER, WORKER


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    checks: dict[str, object] = {}
    try:
        async with request.app[DATABASE].engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))
        if request.app[DATABASE].writer_healthy:
            checks["database"] = {"state": "ok"}
        else:
            checks["database"] = {"state": "unavailable", "detail": "the writer thread stopped"}
    except Exception as exc:  # what failed matters here, not the traceback
        checks["database"] = {"state": "unavailable", "detail": type(exc).__name__}
    checks["s3"] = request.app[S3_CHECKER].verdict.as_json()
    if (worker := request.app.get(WORKER)) is not None:
        health = worker.health
        checks["worker"] = {
            "state": "ok" if health.running and health.can_send else "unavailable",
            "detail": health.detail if health.running else "not running",
        }
    ready = all(check["state"] == "ok" for check in checks.values())  # type: ignore[index]
    return web.json_response(
        {"status": "ok" if ready else "unavailable", "checks": checks}, status=200 if ready else 503
    )
