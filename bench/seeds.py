"""The design users replace: a session check, then an inline POST to Inngest per request.

Nothing is stored: when the process dies or Inngest is down, the event is gone.

python -m bench.seeds --port 18091 --inngest http://127.0.0.1:8288 --key KEY
"""

from __future__ import annotations

import argparse
import os
import uuid

import aiohttp
import aiohttp_session
from aiohttp import web
from aiohttp_session.cookie_storage import EncryptedCookieStorage

HTTP = web.AppKey("http", aiohttp.ClientSession)


async def login(request: web.Request) -> web.Response:
    session = await aiohttp_session.new_session(request)
    session["uid"] = 1
    return web.json_response({"status": "ok"})


async def api(request: web.Request) -> web.Response:
    session = await aiohttp_session.get_session(request)
    if "uid" not in session:
        raise web.HTTPUnauthorized()
    body = await request.json()
    event = {"id": str(uuid.uuid4()), "name": "app/document.requested", "data": body}
    url = f"{request.app['inngest']}/e/{request.app['key']}"
    async with request.app[HTTP].post(url, json=[event]) as response:
        if response.status != 200:
            raise web.HTTPBadGateway()
    return web.json_response({"status": "ok", "id": event["id"]})


async def client(app: web.Application):  # type: ignore[no-untyped-def]
    async with aiohttp.ClientSession() as session:
        app[HTTP] = session
        yield


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--inngest", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()
    app = web.Application()
    app["inngest"], app["key"] = args.inngest, args.key
    aiohttp_session.setup(app, EncryptedCookieStorage(os.urandom(32)))
    app.cleanup_ctx.append(client)
    app.router.add_post("/login", login)
    app.router.add_post("/api", api)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
