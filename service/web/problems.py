"""RFC 9457 problem details: every error the service answers has this shape.

``code`` is stable: clients switch on it, the prose in ``detail`` may change.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

PROBLEM_TYPE_BASE = "https://inngest-outbox.dev/problems/"
CONTENT_TYPE = "application/problem+json"


class Problem(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        title: str,
        detail: str | None = None,
        *,
        headers: dict[str, str] | None = None,
        close: bool = False,
        **extra: Any,
    ) -> None:
        super().__init__(code)
        self.status = status
        self.code = code
        self.title = title
        self.detail = detail
        self.headers = headers or {}
        self.close = close  # end the connection after the answer (its stream is unusable)
        self.extra = extra

    def response(self, instance: str | None = None) -> web.Response:
        body: dict[str, Any] = {
            "type": PROBLEM_TYPE_BASE + self.code,
            "title": self.title,
            "status": self.status,
            "code": self.code,
        }
        if self.detail:
            body["detail"] = self.detail
        if instance:
            body["instance"] = instance
        body.update(self.extra)
        response = web.Response(
            status=self.status,
            text=json.dumps(body, ensure_ascii=False),
            content_type=CONTENT_TYPE,
            headers=self.headers,
        )
        if self.close:
            response.force_close()
        return response


def invalid_field(field: str, rule: str, detail: str) -> Problem:
    return Problem(400, "invalid_field", "A field is invalid", detail, field=field, rule=rule)


def unauthenticated() -> Problem:
    return Problem(401, "unauthenticated", "Not logged in", "Log in at POST /auth/login first.")


# aiohttp's own HTTP errors (routing, body size) mapped onto stable codes.
HTTP_ERROR_CODES: dict[int, tuple[str, str, str]] = {
    400: ("bad_request", "Bad request", "The request could not be read."),
    404: ("not_found", "Not found", "No such resource."),
    405: ("method_not_allowed", "Method not allowed", "See the Allow header."),
    413: ("payload_too_large", "Request body too large", "The request body is too large."),
    431: ("headers_too_large", "Request headers too large", "The headers are too large."),
}


def from_http_exception(exc: web.HTTPException) -> Problem:
    code, title, detail = HTTP_ERROR_CODES.get(
        exc.status, ("http_error", exc.reason, f"HTTP {exc.status}.")
    )
    headers = {}
    if exc.status == 405 and "Allow" in exc.headers:
        headers["Allow"] = exc.headers["Allow"]
    return Problem(exc.status, code, title, detail, headers=headers)


def database_unavailable() -> Problem:
    """Nothing was written: the transaction failed, or the database is not reachable."""
    return Problem(
        503,
        "database_unavailable",
        "The database is unavailable",
        "Nothing was written; retry shortly.",
        headers={"Retry-After": "5"},
    )
