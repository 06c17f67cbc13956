"""Reading a JSON request body strictly: type, size, syntax, shape."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import orjson
from aiohttp import web

from ..keys import SETTINGS
from .problems import Problem


class BodyTooLarge(Exception):
    """The body is over its limit (by its Content-Length, or as it arrived)."""


class BodyTooSlow(Exception):
    """The body did not arrive within the settings' body_timeout_seconds."""

    def __init__(self, timeout: float) -> None:
        super().__init__(f"the body took longer than {timeout:g} seconds to arrive")
        self.timeout = timeout


async def read_body(request: web.Request, max_bytes: int) -> bytes:
    """The whole body, at most ``max_bytes``; BodyTooLarge or BodyTooSlow."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise BodyTooLarge()
    try:
        if request.content.is_eof():
            # The whole body came with the headers (nearly every request):
            # nothing to wait for, so no timer to arm and cancel.
            raw = await request.read()
        else:
            raw = await _read_slow_body(request)
    except web.HTTPRequestEntityTooLarge:
        raise BodyTooLarge() from None
    if len(raw) > max_bytes:
        raise BodyTooLarge()
    return raw


async def read_json_object(request: web.Request, max_bytes: int) -> dict[str, Any]:
    _require_json_content_type(request)
    try:
        raw = await read_body(request, max_bytes)
    except BodyTooLarge:
        raise _too_large(max_bytes) from None
    except BodyTooSlow as slow:
        raise Problem(
            408,
            "request_timeout",
            "The body did not arrive in time",
            f"The request body took longer than {slow.timeout:g} seconds to arrive.",
            close=True,
        ) from None
    return parse_json_object(raw)


async def _read_slow_body(request: web.Request) -> bytes:
    settings = request.app.get(SETTINGS)
    timeout = settings.body_timeout_seconds if settings is not None else 30.0
    try:
        # A client that sends its body a byte at a time must not hold a
        # connection (and a place in the queue) for ever.
        async with asyncio.timeout(timeout):
            return await request.read()
    except TimeoutError:
        raise BodyTooSlow(timeout) from None


def parse_json_object(raw: bytes) -> dict[str, Any]:
    value = _parse_plain(raw)
    if value is None:
        value = _parse_strictly(raw)
    if not isinstance(value, dict):
        raise Problem(
            400,
            "invalid_body",
            "The body must be a JSON object",
            f"Expected a JSON object, got {_json_type(value)}.",
        )
    return value


# Counting keys walks the value in Python: past this size the strict parser is
# as quick.
_PLAIN_MAX_BYTES = 8192


def _parse_plain(raw: bytes) -> Any | None:
    """The common body, parsed at orjson's speed; None: let _parse_strictly decide.

    orjson refuses what the strict parser refuses (bad UTF-8, NaN, 1e999) and
    more (lone surrogates, which the strict parser takes and the event encoder
    then refuses with its own message), so on any error the strict parser
    parses again for the exact error. It turns integers past 64 bits into
    floats, which send the body to the strict parser too. It keeps the last of
    duplicate keys where the strict parser refuses them: every key is followed
    by a colon, so when the body has exactly as many colons as the parsed value
    has keys, no colon is inside a string and no key was repeated.
    """
    if len(raw) > _PLAIN_MAX_BYTES:
        return None
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return value if _count_keys(value) == raw.count(b":") else None


def _count_keys(value: Any) -> int:
    """The keys of every object in ``value``; -1 if it holds a float of 2**63 or
    more, which may have been an integer past 64 bits (orjson makes those inexact
    floats)."""
    keys = 0
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is dict:
            keys += len(item)
            stack.extend(item.values())
        elif kind is list:
            stack.extend(item)
        elif kind is float and abs(item) >= _INT64_LIMIT:
            return -1
    return keys


_INT64_LIMIT = float(2**63)


def _parse_strictly(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Problem(
            400,
            "malformed_json",
            "The body is not valid JSON",
            f"The body is not UTF-8 (invalid byte at offset {exc.start}).",
        ) from None
    try:
        value = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise Problem(
            400,
            "malformed_json",
            "The body is not valid JSON",
            f"{exc.msg} at line {exc.lineno}, column {exc.colno}.",
            line=exc.lineno,
            column=exc.colno,
        ) from None
    except _DuplicateKey as exc:
        raise Problem(
            400, "malformed_json", "The body is not valid JSON", f"Duplicate key {exc.key!r}."
        ) from None
    except RecursionError:
        raise Problem(
            400, "malformed_json", "The body is not valid JSON", "The JSON is nested too deeply."
        ) from None
    except ValueError as exc:
        # Integers past Python's digit limit, NaN and Infinity.
        raise Problem(400, "malformed_json", "The body is not valid JSON", str(exc)) from None
    return value


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return result


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON.")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        # 1e999 parses to inf, which no JSON encoder will write back out.
        raise ValueError(f"The number {text[:40]} is out of range.")
    return value


def _require_json_content_type(request: web.Request) -> None:
    mime = request.content_type  # lower-cased, parameters stripped
    charset = request.charset
    if mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json")):
        if charset is None or charset.lower() in {"utf-8", "utf8"}:
            return
        raise Problem(
            415,
            "unsupported_media_type",
            "Unsupported media type",
            f"JSON must be UTF-8, not {charset}.",
        )
    shown = request.headers.get("Content-Type") or "none"
    raise Problem(
        415,
        "unsupported_media_type",
        "Unsupported media type",
        f"Send Content-Type: application/json (got {shown[:100]}).",
    )


def _too_large(limit: int) -> Problem:
    return Problem(
        413,
        "payload_too_large",
        "Request body too large",
        f"The body may be at most {limit} bytes.",
        limit=limit,
    )


# Built once: json.loads() with options constructs a new decoder per call.
_DECODER = json.JSONDecoder(
    object_pairs_hook=_unique_keys, parse_constant=_reject_constant, parse_float=_finite_float
)


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return "a number"
