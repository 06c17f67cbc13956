"""The OpenAPI 3.1 description of every endpoint, served at GET /openapi.json.

Written by hand, next to the handlers it describes; a test checks that it names
exactly the routes the app serves, and Schemathesis checks the live service
against it.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from .problems import CONTENT_TYPE as PROBLEM

_ID = {"type": "string", "pattern": "^[0-9a-f-]{36}$", "description": "A UUIDv7 event id"}
_TIME = {"type": "string", "format": "date-time"}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _problem(description: str, *codes: str) -> dict[str, Any]:
    schema: dict[str, Any] = _ref("Problem")
    if codes:
        schema = {
            "allOf": [_ref("Problem"), {"properties": {"code": {"enum": list(codes)}}}],
        }
    return {"description": description, "content": {PROBLEM: {"schema": schema}}}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_UNAUTHENTICATED = _problem("Not logged in", "unauthenticated")
_FORBIDDEN = _problem("Not an administrator", "forbidden")
_CROSS_SITE = _problem("Sent by another site's page", "origin_not_allowed")
_BAD_BODY = _problem(
    "The body is not a JSON object, or a field is invalid",
    "malformed_json",
    "invalid_body",
    "invalid_field",
)
_SLOW_BODY = _problem("The body did not arrive in time", "request_timeout")
_NOT_JSON = _problem("Not a JSON content type", "unsupported_media_type")
_TOO_LARGE = _problem("The body is too large", "payload_too_large", "event_too_large")
_SESSION = [{"session": []}]
_ANY_STATUS = {"type": "string", "enum": ["pending", "sending", "delivered", "failed"]}


def _query(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema or {"type": "string"},
    }


_HTML = {"text/html": {"schema": {"type": "string"}}}
_EVENT_ID_PATH = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}

SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "inngest-outbox",
        "version": "1",
        "description": "Durable transactional outbox for Inngest. Errors are RFC 9457 "
        "problem details with a stable `code`.",
    },
    "components": {
        "securitySchemes": {
            "session": {"type": "apiKey", "in": "cookie", "name": "inngest_outbox_session"},
            "metricsToken": {
                "type": "http",
                "scheme": "bearer",
                "description": "METRICS_TOKEN, when the service has one",
            },
        },
        "schemas": {
            "InngestEvent": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "data": {"type": "object"},
                    "user": {"type": "object"},
                    "id": {"type": "string"},
                    "ts": {"type": "integer", "description": "milliseconds since the epoch"},
                    "v": {"type": "string"},
                },
            },
            "InngestAnswer": {
                "type": "object",
                "required": ["status"],
                "properties": {
                    "ids": {"type": "array", "items": {"type": "string"}},
                    "status": {"type": "integer"},
                    "error": {"type": "string"},
                },
            },
            "Problem": {
                "type": "object",
                "required": ["type", "title", "status", "code"],
                "properties": {
                    "type": {"type": "string"},
                    "title": {"type": "string"},
                    "status": {"type": "integer"},
                    "code": {"type": "string"},
                    "detail": {"type": "string"},
                    "instance": {"type": "string"},
                },
            },
            "Login": {
                "type": "object",
                "required": ["username", "password"],
                "properties": {
                    "username": {"type": "string", "minLength": 1},
                    "password": {"type": "string", "minLength": 1},
                },
            },
            "Document": {
                "type": "object",
                "required": ["documentName"],
                "properties": {"documentName": {"type": "string", "minLength": 1}},
                "additionalProperties": True,
                "description": "Every other field travels as event data too.",
            },
            "Accepted": {
                "type": "object",
                "required": ["status", "id"],
                "properties": {"status": {"const": "ok"}, "id": _ID},
            },
            "ClientEvent": {
                "type": "object",
                "required": ["id", "documentName", "createdAt", "status"],
                "properties": {
                    "id": {"type": "string"},
                    "documentName": {"type": "string"},
                    "createdAt": _TIME,
                    "status": {"enum": ["pending", "sending", "delivered", "failed", "purged"]},
                    "deliveredAt": _TIME,
                    "attempts": {"type": "integer"},
                    "error": {"type": "string"},
                    "replayedAs": {"type": "string"},
                },
            },
            "Replay": {
                "type": "object",
                "description": "Event ids, or a filter with status; not both.",
                "oneOf": [{"required": ["ids"]}, {"required": ["status"]}],
                "properties": {
                    "ids": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                    "status": {"enum": ["failed", "delivered"]},
                    "name": {"type": "string"},
                    "since": {"type": "string"},
                    "until": {"type": "string"},
                    "newId": {"type": "boolean"},
                    "dryRun": {"type": "boolean"},
                },
            },
            "Checks": {
                "type": "object",
                "required": ["status", "checks"],
                "properties": {
                    "status": {"enum": ["ok", "unavailable"]},
                    "checks": {
                        "type": "object",
                        "description": "Each check by name: its state, and for an admin, "
                        "the metrics token or the metrics port, what is behind it.",
                        "additionalProperties": {
                            "type": "object",
                            "required": ["state"],
                            "properties": {"state": {"type": "string"}},
                        },
                    },
                },
            },
        },
    },
    "paths": {
        "/healthz": {
            "get": {
                "summary": "The process serves",
                "responses": {"200": _json("Alive", {"type": "object"})},
            }
        },
        "/readyz": {
            "get": {
                "summary": "Database, schema, S3 and worker checks",
                "description": "Anyone sees each check's state (ok, degraded, elsewhere or "
                "unavailable); an admin's session or the METRICS_TOKEN sees the details.",
                "security": [{}, {"session": []}, {"metricsToken": []}],
                "responses": {
                    "200": _json("Ready", _ref("Checks")),
                    "503": _json("Not ready", _ref("Checks")),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "description": "Needs the METRICS_TOKEN when the service has one; with "
                "METRICS_PORT and no token, served on that port only.",
                "security": [{}, {"metricsToken": []}],
                "responses": {
                    "200": {
                        "description": "Prometheus text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    "401": _problem("The METRICS_TOKEN is required", "invalid_token"),
                    "404": _problem("Served on the metrics port", "not_found"),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {"200": _json("OpenAPI 3.1", {"type": "object"})},
            }
        },
        "/auth/login": {
            "post": {
                "summary": "Log in: sets the session cookie",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("Login")}},
                },
                "responses": {
                    "200": _json("Logged in", {"type": "object"}),
                    "400": _BAD_BODY,
                    "401": _problem("Wrong username or password", "invalid_credentials"),
                    "403": _CROSS_SITE,
                    "413": _TOO_LARGE,
                    "415": _NOT_JSON,
                    "429": _problem("Too many failed logins", "too_many_logins"),
                    "503": _problem(
                        "Too many logins at once, or the database is unavailable",
                        "login_busy",
                        "database_unavailable",
                    ),
                },
            }
        },
        "/auth/logout": {
            "post": {
                "summary": "Log out: revokes the session",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                "responses": {
                    "204": {"description": "Logged out"},
                    "400": _BAD_BODY,
                    "403": _CROSS_SITE,
                    "408": _SLOW_BODY,
                    "413": _TOO_LARGE,
                    "415": _NOT_JSON,
                },
            }
        },
        "/auth/me": {
            "get": {
                "summary": "Who is logged in",
                "security": _SESSION,
                "responses": {
                    "200": _json("The user", {"type": "object"}),
                    "401": _UNAUTHENTICATED,
                },
            }
        },
        "/api": {
            "post": {
                "summary": "Accept a document request; its event enters the outbox",
                "security": _SESSION,
                "parameters": [
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                    }
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("Document")}},
                },
                "responses": {
                    "200": _json("Committed", _ref("Accepted")),
                    "400": _problem(
                        "Bad body or header",
                        "malformed_json",
                        "invalid_body",
                        "invalid_field",
                        "invalid_idempotency_key",
                    ),
                    "401": _UNAUTHENTICATED,
                    "403": _CROSS_SITE,
                    "408": _SLOW_BODY,
                    "413": _TOO_LARGE,
                    "415": _NOT_JSON,
                    "422": _problem("Idempotency key reused", "idempotency_key_reused"),
                    "503": _problem(
                        "Nothing written; retry",
                        "s3_unavailable",
                        "database_unavailable",
                        "overloaded",
                    ),
                },
            }
        },
        "/api/events/{id}": {
            "get": {
                "summary": "The logged-in user's own event",
                "security": _SESSION,
                "parameters": [_EVENT_ID_PATH],
                "responses": {
                    "200": _json("The event", _ref("ClientEvent")),
                    "401": _UNAUTHENTICATED,
                    "404": _problem("Not this user's event", "event_not_found"),
                },
            }
        },
        "/e/{key}": {
            "post": {
                "summary": "Inngest's event API: store events durably for delivery to Inngest",
                "description": "What Inngest SDKs send to (INNGEST_EVENT_API_BASE_URL). The key "
                "is a relay key (`inngest-outbox keys add`). Answered once every event is "
                "stored; errors are Inngest's shape, not problem+json.",
                "parameters": [
                    {
                        "name": "key",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                        "description": "A relay key",
                    },
                    {
                        "name": "x-inngest-event-id-seed",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string"},
                        "description": "<ms>,<base64 of 10 bytes>: a retry with the same seed "
                        "gets the same ids",
                    },
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "oneOf": [
                                    _ref("InngestEvent"),
                                    {
                                        "type": "array",
                                        "maxItems": 5000,
                                        "items": _ref("InngestEvent"),
                                    },
                                ]
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json("Stored: one id per event, in order", _ref("InngestAnswer")),
                    "400": _json("An event breaks a rule: nothing stored", _ref("InngestAnswer")),
                    "401": _json("Unknown or revoked key: nothing stored", _ref("InngestAnswer")),
                    "408": _json("The body did not arrive in time", _ref("InngestAnswer")),
                    "413": _json("The body is too large: nothing stored", _ref("InngestAnswer")),
                    "503": _json("Not stored; retry", _ref("InngestAnswer")),
                },
            }
        },
        "/admin": {
            "get": {
                "summary": "The admin page (HTML)",
                "responses": {
                    "200": {
                        "description": "The page, or a login form",
                        "content": {"text/html": {}},
                    },
                    "403": {"description": "Not an administrator", "content": {"text/html": {}}},
                },
            }
        },
        "/admin/api/stats": {
            "get": {
                "summary": "Outbox counts and the last hour per minute",
                "security": _SESSION,
                "responses": {
                    "200": _json("Stats", {"type": "object", "required": ["stats", "timeline"]}),
                    "401": _UNAUTHENTICATED,
                    "403": _FORBIDDEN,
                },
            }
        },
        "/admin/api/events": {
            "get": {
                "summary": "Events, newest first, a page at a time",
                "security": _SESSION,
                "parameters": [
                    _query("status", "Only this state", _ANY_STATUS),
                    _query("name", "Only this event name"),
                    _query("since", "Created at or after (ISO 8601, or an age: 2h)"),
                    _query("until", "Created before"),
                    _query("limit", "Events per page", {"type": "integer"}),
                    _query("cursor", "nextCursor of the previous page"),
                ],
                "responses": {
                    "200": _json(
                        "A page", {"type": "object", "required": ["events", "nextCursor"]}
                    ),
                    "400": _problem("A bad parameter", "invalid_query"),
                    "401": _UNAUTHENTICATED,
                    "403": _FORBIDDEN,
                },
            }
        },
        "/admin/api/events/{id}": {
            "get": {
                "summary": "One event with its history",
                "security": _SESSION,
                "parameters": [_EVENT_ID_PATH],
                "responses": {
                    "200": _json("The event", {"type": "object"}),
                    "401": _UNAUTHENTICATED,
                    "403": _FORBIDDEN,
                    "404": _problem("No such event", "event_not_found"),
                },
            }
        },
        "/admin/api/replay": {
            "post": {
                "summary": "Put failed or delivered events back to pending",
                "security": _SESSION,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("Replay")}},
                },
                "responses": {
                    "200": _json("What moved", {"type": "object"}),
                    "400": _BAD_BODY,
                    "401": _UNAUTHENTICATED,
                    "403": _problem(
                        "Not an administrator, or cross-site", "forbidden", "origin_not_allowed"
                    ),
                    "413": _TOO_LARGE,
                    "415": _NOT_JSON,
                },
            }
        },
    },
}

# Whatever reads or writes the database answers 503 database_unavailable when it
# cannot reach it (the middleware's mapping), besides its own answers.
_DATABASE_DOWN = _problem("The database is unavailable: nothing written", "database_unavailable")
for _path, _operations in SPEC["paths"].items():
    if _path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        continue
    for _operation in _operations.values():
        _operation["responses"].setdefault("503", _DATABASE_DOWN)

_BODY = json.dumps(SPEC, indent=1).encode()


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=_BODY, content_type="application/json")
