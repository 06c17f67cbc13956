"""Request ids and error rendering."""

from __future__ import annotations

import contextvars
import logging
import re
import time

from aiohttp import web
from aiohttp.typedefs import Handler
from aiohttp.web_log import AccessLogger

from ..ids import new_request_id
from ..keys import METRICS, SETTINGS
from ..store.errors import is_unavailable
from .forwarded import own_origin, parse_origin
from .problems import Problem, database_unavailable, from_http_exception

log = logging.getLogger(__name__)

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
_INCOMING_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class RequestIdFilter(logging.Filter):
    """Puts the current request's id on every log record it causes."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def shown_path(request: web.BaseRequest) -> str:
    """The request's path as logs and error bodies show it: a relay key in the
    path (POST /e/{key}) is a secret."""
    path = request.path
    if path.startswith("/e/"):
        return "/e/{key}"
    return path


class RequestIdAccessLogger(AccessLogger):
    """aiohttp writes the access line after the middleware has returned (and reset
    the request id): take the id back from the response for that line."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if request.path.startswith("/e/"):
            request = request.clone(rel_url="/e/REDACTED")  # the key is a secret
        token = request_id_var.set(response.headers.get("X-Request-Id", "-"))
        try:
            super().log(request, response, time)
        finally:
            request_id_var.reset(token)


@web.middleware
async def request_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A request id on the response and on every log line; errors as problem+json;
    the request in the metrics.

    One middleware, not three: each layer costs every request a coroutine.
    """
    started = time.perf_counter()
    incoming = request.headers.get("X-Request-Id", "")
    request_id = incoming if _INCOMING_ID.fullmatch(incoming) else new_request_id()
    token = request_id_var.set(request_id)
    try:
        try:
            if request.method not in _SAFE_METHODS:
                _check_origin(request)
            response = await handler(request)
        except Problem as problem:
            response = problem.response(shown_path(request))
        except web.HTTPException as exc:
            if exc.status < 400:
                exc.headers["X-Request-Id"] = request_id
                _observe(request, exc.status, started)
                raise
            response = from_http_exception(exc).response(shown_path(request))
        except Exception as exc:
            if is_unavailable(exc):
                # The database went away under a read (a session check, a
                # list): the same answer as a write that could not commit.
                log.error("database unavailable in %s %s: %s", request.method, shown_path(request),
                          type(exc).__name__)  # fmt: skip
                response = database_unavailable().response(shown_path(request))
            else:
                # Never echo exception text: it can hold data and secrets.
                log.exception("unhandled error in %s %s", request.method, shown_path(request))
                response = Problem(
                    500,
                    "internal_error",
                    "Internal server error",
                    f"Quote request id {request_id} when reporting this.",
                ).response(shown_path(request))
        response.headers["X-Request-Id"] = request_id
        _observe(request, response.status, started)
        return response
    finally:
        request_id_var.reset(token)


_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _check_origin(request: web.Request) -> None:
    """A browser names the page that sent a POST in Origin: refuse other sites'.

    The service's own origin is the scheme, host and port the client reached (a
    page served over plain HTTP on the same host is another origin). Requests
    without Origin (curl, servers) pass: the cookie is SameSite=Lax and a JSON
    content type is required, so a browser cannot send one unnoticed.
    """
    origin = request.headers.get("Origin")
    if origin is None:
        return
    sent = parse_origin(origin)
    if sent is not None:
        if sent == own_origin(request):
            return
        settings = request.app.get(SETTINGS)  # a worker's status app has none
        if settings is not None and any(
            sent == parse_origin(allowed) for allowed in settings.allowed_origins
        ):
            return
    raise Problem(
        403,
        "origin_not_allowed",
        "Cross-site request refused",
        "This origin may not send requests here; see ALLOWED_ORIGINS.",
    )


def _observe(request: web.Request, status: int, started: float) -> None:
    resource = request.match_info.route.resource
    request.app[METRICS].observe_request(
        resource.canonical if resource is not None else "unmatched",
        request.method,
        status,
        time.perf_counter() - started,
    )
