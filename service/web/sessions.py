"""POST /auth/login, POST /auth/logout, GET /auth/me."""

from __future__ import annotations

import asyncio

from aiohttp import web

from .. import auth
from ..keys import DATABASE, LOGIN_THROTTLE, PASSWORDS, SESSION_REGISTRY, SESSIONS, SETTINGS
from .body import read_json_object
from .forwarded import client_address
from .problems import Problem, invalid_field, unauthenticated

MAX_LOGIN_BODY_BYTES = 8 * 1024
MAX_LOGOUT_BODY_BYTES = 1024


async def login(request: web.Request) -> web.Response:
    body = await read_json_object(request, MAX_LOGIN_BODY_BYTES)
    username = body.get("username")
    password = body.get("password")
    if not isinstance(username, str) or not username:
        raise invalid_field("username", "required", "username must be a non-empty string.")
    if not isinstance(password, str) or not password:
        raise invalid_field("password", "required", "password must be a non-empty string.")
    db = request.app[DATABASE]
    throttle = request.app[LOGIN_THROTTLE]
    try:
        attempt = await throttle.begin(db, username, client_address(request))
    except auth.TooManyLogins as exc:
        retry_after = exc.retry_after_seconds
        raise Problem(
            429,
            "too_many_logins",
            "Too many failed logins",
            f"Too many failed logins from this address; retry in {retry_after} seconds.",
            headers={"Retry-After": str(retry_after)},
        ) from None
    if attempt.delay_seconds:
        # Many failures for this name, from wherever: slow its logins down,
        # never refuse them (its owner must still get in).
        await asyncio.sleep(attempt.delay_seconds)
    if len(password) > auth.MAX_PASSWORD_LENGTH or len(username) > 64:
        user = None  # too long to be anyone's; still answer as for a wrong password
    else:
        try:
            user = await request.app[PASSWORDS].authenticate(db, username, password)
        except auth.VerifierBusy:
            await throttle.abandon(db, attempt)
            raise Problem(
                503,
                "login_busy",
                "Too many logins at once",
                "Too many password checks are waiting; retry shortly.",
                headers={"Retry-After": "1"},
            ) from None
    if user is None:
        # The attempt's rows, written before the check, are its failure.
        raise Problem(
            401, "invalid_credentials", "Login failed", "The username or password is wrong."
        )
    await throttle.succeeded(db, attempt)
    settings = request.app[SETTINGS]
    session_id = await request.app[SESSION_REGISTRY].open(
        db, user.id, settings.session_max_age_seconds
    )
    response = web.json_response(
        {
            "username": user.username,
            "admin": user.is_admin,
            "expires_in": settings.session_max_age_seconds,
        }
    )
    await auth.log_in(request.app[SESSIONS], request, response, user, session_id)
    return response


async def logout(request: web.Request) -> web.Response:
    """Revokes the session server-side: a copy of the cookie is refused from now on.

    Its body is a JSON object (``{}``), as for every route that changes state: a
    page of another site cannot send one without the browser asking first.
    """
    await read_json_object(request, MAX_LOGOUT_BODY_BYTES)
    found = await auth.session_of(request.app[SESSIONS], request)
    if found is not None:
        await request.app[SESSION_REGISTRY].revoke(request.app[DATABASE], found[0])
    response = web.Response(status=204)
    await auth.log_out(request.app[SESSIONS], request, response)
    return response


async def me(request: web.Request) -> web.Response:
    user = await current_user(request)
    if user is None:
        raise unauthenticated()
    return web.json_response({"id": user.id, "username": user.username, "admin": user.is_admin})


async def current_user(request: web.Request) -> auth.User | None:
    """Who is logged in: a cookie that decrypts, naming a session still open."""
    found = await auth.session_of(request.app[SESSIONS], request)
    if found is None:
        return None
    session_id, user = found
    if not await request.app[SESSION_REGISTRY].is_valid(request.app[DATABASE], session_id, user.id):
        return None
    return user
