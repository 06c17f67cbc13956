"""Errors found by aiohttp's HTTP parser, before any handler or middleware runs,
answered as problem+json like every other error.

aiohttp answers them itself in text/plain, echoing the offending bytes, and logs
each with a traceback at ERROR: a client sending garbage could fill the logs.
Here they get a stable code, no echo, and one line at INFO.
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from .problems import Problem

log = logging.getLogger(__name__)


class _ProblemRequestHandler(RequestHandler):
    __slots__ = ()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            return super().handle_error(request, status, exc, message)
        if request.writer.output_size > 0:
            raise ConnectionError("an answer was already being sent")
        if isinstance(exc, LineTooLong):
            problem = Problem(
                431,
                "headers_too_large",
                "Request headers too large",
                "A request line or header is longer than the server accepts.",
            )
        else:
            problem = Problem(
                status,
                "bad_request",
                "Bad request",
                "The request is not valid HTTP/1.1 (method, target, headers or framing).",
            )
        if not isinstance(exc, BadHttpMethod):  # TLS or noise on a plain port: not worth a line
            log.info("refused a malformed request from %s: %s", request.remote, type(exc).__name__)
        response = problem.response()
        response.force_close()
        return response


class _ProblemServer(Server):
    def __call__(self) -> RequestHandler:
        return _ProblemRequestHandler(self, loop=self._loop, **self._kwargs)


class AppRunner(web.AppRunner):
    """web.AppRunner whose connections answer parser errors as problem+json."""

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        server.__class__ = _ProblemServer  # the same object, only the handler class differs
        return server
