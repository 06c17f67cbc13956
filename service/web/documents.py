"""POST /api: accept a document request and put its event in the outbox."""

from __future__ import annotations

import hashlib
import json
import time
import unicodedata
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from .. import outbox
from ..ids import new_event_id
from ..intake import (
    IdempotencyKeyReused,
    IntakeClosed,
    Overloaded,
    StorageUnavailable,
    Submission,
)
from ..keys import INTAKE, S3_CHECKER, SETTINGS
from ..store.encoding import RawJSON
from .body import read_json_object
from .problems import Problem, database_unavailable, invalid_field, unauthenticated
from .sessions import current_user

MAX_DOCUMENT_NAME_BYTES = 1024
MAX_IDEMPOTENCY_KEY_LENGTH = 255
RETRY_AFTER_OVERLOADED_SECONDS = "1"


async def post_document(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    user = await current_user(request)
    if user is None:
        raise unauthenticated()
    body = await read_json_object(request, settings.max_body_bytes)
    document_name = validate_document_name(body.get("documentName", _MISSING))
    idempotency_key = read_idempotency_key(request)
    verdict = request.app[S3_CHECKER].verdict
    if not verdict.ok:
        raise Problem(
            503,
            "s3_unavailable",
            "Storage is unavailable",
            "The service's S3 credentials are not configured or failed their last check.",
            headers={"Retry-After": "30"},
        )

    now = datetime.now(UTC)
    event_id = new_event_id()
    event = outbox.build_event(
        event_id=event_id,
        name=settings.inngest_event_name,
        data=body,
        user_id=user.id,
        username=user.username,
        ts_ms=time.time_ns() // 1_000_000,
    )
    payload = serialize_event(event, settings.max_event_bytes)
    submission = Submission(
        user_id=user.id,
        document_name=document_name,
        event=outbox.NewEvent(
            id=event_id, name=settings.inngest_event_name, payload=payload, created_at=now
        ),
        idempotency_key=idempotency_key,
        request_hash=_request_hash(body) if idempotency_key else None,
    )
    try:
        accepted = await request.app[INTAKE].submit(submission)
    except IdempotencyKeyReused:
        raise Problem(
            422,
            "idempotency_key_reused",
            "Idempotency key reused",
            "This Idempotency-Key was already used with a different request body.",
        ) from None
    except Overloaded:
        raise Problem(
            503,
            "overloaded",
            "Too many requests in flight",
            "The database is not keeping up; retry shortly.",
            headers={"Retry-After": RETRY_AFTER_OVERLOADED_SECONDS},
        ) from None
    except (StorageUnavailable, IntakeClosed):
        raise database_unavailable() from None
    headers = {"Idempotent-Replayed": "true"} if accepted.replayed else None
    # The id is a UUID (no character needs escaping): no JSON encoder needed.
    body = b'{"status": "ok", "id": "' + accepted.event_id.encode() + b'"}'
    return web.Response(body=body, content_type="application/json", headers=headers)


class _Missing:
    pass


_MISSING = _Missing()


# Characters a name shown to people must not hold, by Unicode category: they are
# invisible, reorder what is shown (bidi overrides: "Trojan Source"), or mean
# nothing yet. (Cs, lone surrogates, fail the UTF-8 check before this.)
_AWKWARD = {
    "Cc": ("control_characters", "control characters"),
    "Cf": ("format_characters", "invisible format characters such as bidi controls"),
    "Co": ("private_use", "private-use characters"),
    "Cn": ("unassigned", "unassigned code points"),
    "Zl": ("line_separator", "line or paragraph separators"),
    "Zp": ("line_separator", "line or paragraph separators"),
}
# Zero-width (non-)joiners are format characters that scripts and emoji need.
_JOINERS = frozenset("\u200c\u200d")


def validate_document_name(value: object) -> str:
    field = "documentName"
    if value is _MISSING:
        raise invalid_field(field, "required", "documentName is required.")
    if not isinstance(value, str):
        raise invalid_field(field, "type", "documentName must be a string.")
    if not value.strip():
        raise invalid_field(field, "empty", "documentName must not be empty.")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise invalid_field(
            field, "invalid_unicode", "documentName contains an unpaired UTF-16 surrogate."
        ) from None
    if size > MAX_DOCUMENT_NAME_BYTES:
        raise invalid_field(
            field,
            "too_long",
            f"documentName may be at most {MAX_DOCUMENT_NAME_BYTES} bytes of UTF-8, not {size}.",
        )
    if not value.isprintable():  # the cheap test first: most names are plain text
        for ch in value:
            if (rule := _AWKWARD.get(unicodedata.category(ch))) and ch not in _JOINERS:
                raise invalid_field(
                    field,
                    rule[0],
                    f"documentName must not contain {rule[1]} (U+{ord(ch):04X}).",
                )
    if value.startswith(("/", "\\")):
        raise invalid_field(field, "leading_slash", "documentName must not start with '/' or '\\'.")
    if ".." in value.replace("\\", "/").split("/"):
        raise invalid_field(field, "dot_segment", "documentName must not have a '..' segment.")
    return value


def read_idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_LENGTH or not all("!" <= ch <= "~" for ch in key):
        raise Problem(
            400,
            "invalid_idempotency_key",
            "Invalid Idempotency-Key header",
            f"An Idempotency-Key is 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} visible ASCII characters.",
        )
    return key


# The standard encoder, built once (json.dumps with options builds one per
# call), for what orjson does not take: integers past 64 bits, lone surrogates,
# nesting past 254 levels.
_EVENT_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def serialize_event(event: dict[str, Any], limit: int) -> RawJSON:
    """The event as compact UTF-8 JSON text, refused if Inngest would refuse its size."""
    try:
        # A tenth of the standard encoder's time, and its output is already
        # the UTF-8 that is measured. (No NaN or infinity can reach here: the
        # body's parser refused them.)
        encoded = orjson.dumps(event)
    except TypeError:
        return _serialize_unusual(event, limit)
    _check_event_size(len(encoded), limit)
    return RawJSON(encoded.decode("utf-8"))


def _serialize_unusual(event: dict[str, Any], limit: int) -> RawJSON:
    try:
        text = _EVENT_ENCODER.encode(event)
    except RecursionError:
        # Deeper than the standard encoder goes (orjson parsed it: it takes 1023 levels).
        raise Problem(
            400, "malformed_json", "The body is not valid JSON", "The JSON is nested too deeply."
        ) from None
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise Problem(
            400,
            "malformed_json",
            "The body is not valid JSON",
            "A string in the body contains an unpaired UTF-16 surrogate.",
        ) from None
    _check_event_size(size, limit)
    return RawJSON(text)


def _check_event_size(size: int, limit: int) -> None:
    if size > limit:
        raise Problem(
            413,
            "event_too_large",
            "The event would be too large",
            f"The event would be {size} bytes; Inngest accepts at most {limit}.",
            limit=limit,
            size=size,
        )


def _request_hash(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()
