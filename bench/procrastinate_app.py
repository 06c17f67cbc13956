"""What a Python user picks for durable work on PostgreSQL: an aiohttp handler
that checks an aiohttp-session cookie and defers a procrastinate job.

    .venv/bin/python -m bench.procrastinate_app --port 18092 --dsn postgresql://...
    .venv/bin/python -m bench.procrastinate_app --dsn postgresql://... --apply-schema

Needs the `bench` extra (procrastinate, psycopg). ``defer_async`` inserts the
job in a transaction of its own (procrastinate's ``procrastinate_defer_jobs_v1``;
a trigger NOTIFYs its workers) and answers once it is committed, as `POST /api`
does; no procrastinate worker runs, so its figure holds no delivery.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import AsyncIterator

import aiohttp_session
import procrastinate
from aiohttp import web
from aiohttp_session.cookie_storage import EncryptedCookieStorage

from bench.seeds import login  # the same login as the other baseline server

PROCRASTINATE = web.AppKey("procrastinate", procrastinate.App)


def procrastinate_app(dsn: str) -> procrastinate.App:
    # A pool as large as SQLAlchemy's default (5, and 10 more under load).
    connector = procrastinate.PsycopgConnector(conninfo=dsn, min_size=5, max_size=15)
    app = procrastinate.App(connector=connector)

    @app.task(name="document_requested")
    async def document_requested(**document: object) -> None:
        pass

    return app


async def api(request: web.Request) -> web.Response:
    session = await aiohttp_session.get_session(request)
    if "uid" not in session:
        raise web.HTTPUnauthorized()
    body = await request.json()
    task = request.app[PROCRASTINATE].tasks["document_requested"]
    job_id = await task.defer_async(user=session["uid"], document=body)
    return web.json_response({"status": "ok", "id": str(job_id)})


def create_app(dsn: str) -> web.Application:
    app = web.Application()
    aiohttp_session.setup(app, EncryptedCookieStorage(os.urandom(32)))

    async def jobs(app: web.Application) -> AsyncIterator[None]:
        async with procrastinate_app(dsn).open_async() as opened:
            app[PROCRASTINATE] = opened
            yield

    app.cleanup_ctx.append(jobs)
    app.router.add_post("/login", login)
    app.router.add_post("/api", api)
    return app


async def apply_schema(dsn: str) -> None:
    async with procrastinate_app(dsn).open_async() as app:
        await app.schema_manager.apply_schema_async()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--apply-schema", action="store_true", help="create its tables, then exit")
    args = parser.parse_args()
    if args.apply_schema:
        asyncio.run(apply_schema(args.dsn))
        return
    web.run_app(create_app(args.dsn), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
