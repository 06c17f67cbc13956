"""POST /auth/login, POST /auth/logout, GET /auth/me."""

from __future__ import annotations

from aiohttp import web

from .. import auth
from ..keys import DATABASE, PASSWORDS, SESSIONS, SETTINGS
from .body import read_json_object
from .problems import Problem, invalid_field, unauthenticated

MAX_LOGIN_BODY_BYTES = 8 * 1024


async def login(request: web.Request) -> web.Response:
    body = await read_json_object(request, MAX_LOGIN_BODY_BYTES)
    username = body.get("username")
    password = body.get("password")
    if not isinstance(username, str) or not username:
        raise invalid_field("username", "required", "username must be a non-empty string.")
    if not isinstance(password, str) or not password:
        raise invalid_field("password", "required", "password must be a non-empty string.")
    if len(password) > auth.MAX_PASSWORD_LENGTH or len(username) > 64:
        user = None  # too long to be anyone's; still answer as for a wrong password
    else:
        try:
            user = await request.app[PASSWORDS].authenticate(
                request.app[DATABASE], username, password
            )
        except auth.VerifierBusy:
            raise Problem(
                503,
                "login_busy",
                "Too many logins at once",
                "Too many password checks are waiting; retry shortly.",
                headers={"Retry-After": "1"},
            ) from None
    if user is None:
        raise Problem(
            401, "invalid_credentials", "Login failed", "The username or password is wrong."
        )
    settings = request.app[SETTINGS]
    response = web.json_response(
        {
            "username": user.username,
            "admin": user.is_admin,
            "expires_in": settings.session_max_age_seconds,
        }
    )
    await auth.log_in(request.app[SESSIONS], request, response, user)
    return response


async def logout(request: web.Request) -> web.Response:
    response = web.Response(status=204)
    await auth.log_out(request.app[SESSIONS], request, response)
    return response


async def me(request: web.Request) -> web.Response:
    user = await auth.current_user(request.app[SESSIONS], request)
    if user is None:
        raise unauthenticated()
    return web.json_response({"id": user.id, "username": user.username, "admin": user.is_admin})
