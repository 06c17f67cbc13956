"""Sending a batch to Inngest's event API and classifying the answer.

See shared/inngest-event-api.md. The event key is part of the URL path, so
neither the URL nor anything that may quote it is ever logged or recorded:
every error text passes through ``redact``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import aiohttp

from .. import __version__
from .backoff import parse_retry_after

MAX_RECORDED_BODY = 2000
# What is read of an answer: its error, or one id per event sent (Inngest's
# ids are 26-character ULIDs; 64 bytes each leaves room for any other form).
MAX_READ_BODY = 64 * 1024
MAX_READ_PER_EVENT = 64
USER_AGENT = f"inngest-outbox/{__version__}"


@dataclass(frozen=True, slots=True)
class Accepted:
    """200 with one id per event."""


@dataclass(frozen=True, slots=True)
class Rejected:
    """400: the first ``accepted`` events were ingested, then one was invalid."""

    accepted: int
    error: str


@dataclass(frozen=True, slots=True)
class IngestFailed:
    """400 whose error is not the events' fault: Inngest failed to take them
    (its queue, a timeout inside it). The first ``accepted`` were ingested;
    the rest are sent again later, attempts counted, as after a 500."""

    accepted: int
    error: str


@dataclass(frozen=True, slots=True)
class TooLarge:
    """413: the request, or one event in it, is too large."""

    error: str


@dataclass(frozen=True, slots=True)
class KeyRejected:
    """401/403/404: the event key is wrong or of another environment."""

    status: int
    error: str


@dataclass(frozen=True, slots=True)
class Transient:
    """Retry later, counting an attempt: 500 and other 5xx, unexpected answers."""

    status: int | None
    error: str
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class Unavailable:
    """Inngest is down, overloaded or unreachable: no answer (refused, reset,
    timed out), 502, 503, 504 or 429. Not the events' fault: they wait without
    spending attempts, however long it lasts."""

    status: int | None
    error: str
    retry_after: float | None = None


Outcome = Accepted | Rejected | IngestFailed | TooLarge | KeyRejected | Transient | Unavailable

# Answers that say "not now" about the endpoint, not about the events.
UNAVAILABLE_STATUSES = frozenset({429, 502, 503, 504})

# Inngest answers 400 for every error of its event handler, its own failures
# included. Only these messages blame the event (inngest/inngest, read at
# 253303cdffec27f6c70e208114305326baaa5dd7): each is the start of the error text,
# with where the server makes it. Any other 400 is Inngest failing, as a 500 is.
EVENT_FAULTS: tuple[tuple[str, str], ...] = (
    ("event name is empty", "pkg/event/event.go Event.Validate"),
    ("event name is reserved for internal use", "pkg/event/inbound.go ErrInternalEventName"),
    ("timestamp is before Jan 1, 1980", "pkg/event/event.go Event.Validate"),
    ("timestamp is after Jan 1, 2100", "pkg/event/event.go Event.Validate"),
    ("event session", "pkg/event/sessions.go Sessions.UnmarshalJSON and Validate"),
    ("json: cannot unmarshal", "encoding/json UnmarshalTypeError, pkg/api/api.go ReceiveEvent"),
    ("invalid character", "encoding/json SyntaxError, pkg/eventstream ParseStream"),
    ("Event is over the max size", "pkg/eventstream/eventstream.go ErrEventTooLarge"),
    (
        "Request body must contain an event object or an array of event objects",
        "pkg/eventstream/eventstream.go ErrInvalidRequestBody",
    ),
    ("Cannot have more than", "pkg/eventstream/errors.go ErrEventCount"),
)


def blames_the_event(error: str) -> bool:
    """True when a 400's error says an event broke one of Inngest's rules."""
    return error.startswith(tuple(message for message, _ in EVENT_FAULTS))


class InngestClient:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        base_url: str,
        event_key: str,
        env: str | None = None,
        timeout_seconds: float = 10.0,
    ) -> None:
        self._session = session
        self._url = f"{base_url.rstrip('/')}/e/{event_key}"
        self._key = event_key
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._timeout_seconds = timeout_seconds
        self._headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
        if env:
            self._headers["X-Inngest-Env"] = env

    def redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    async def send(self, payloads: Sequence[str]) -> Outcome:
        """POST the events (already serialised) as one JSON array."""
        body = ("[" + ",".join(payloads) + "]").encode("utf-8")
        try:
            async with self._session.post(
                self._url,
                data=body,
                headers=self._headers,
                timeout=self._timeout,
                allow_redirects=False,
            ) as response:
                cap = MAX_READ_BODY + MAX_READ_PER_EVENT * len(payloads)
                text = (await _read_capped(response.content, cap)).decode("utf-8", "replace")
                return self._classify(
                    response.status, text, len(payloads), response.headers.get("Retry-After")
                )
        except TimeoutError:
            return Unavailable(None, f"timed out after {self._timeout_seconds:g}s")
        except aiohttp.ClientError as exc:
            return Unavailable(None, self.redact(f"{type(exc).__name__}: {exc}"))
        except asyncio.CancelledError:
            raise
        except OSError as exc:
            return Unavailable(None, self.redact(f"{type(exc).__name__}: {exc}"))

    def _classify(self, status: int, text: str, count: int, retry_after: str | None) -> Outcome:
        recorded = self.redact(f"HTTP {status}: {text[:MAX_RECORDED_BODY]}")
        body = _json_object(text)
        ids = body.get("ids") if body is not None else None
        if status == 200:
            if isinstance(ids, list) and len(ids) == count and _accepted(ids, count) == count:
                return Accepted()
            return Transient(status, f"unexpected answer to {count} events: {recorded}")
        if status == 400:
            accepted = _accepted(ids, count)
            error = body.get("error") if body is not None else None
            if isinstance(error, str) and blames_the_event(error):
                return Rejected(accepted, self.redact(f"HTTP 400: {error}"))
            detail = error if isinstance(error, str) and error else text[:MAX_RECORDED_BODY]
            return IngestFailed(
                accepted, self.redact(f"HTTP 400, Inngest failed to take the events: {detail}")
            )
        if status == 413:
            return TooLarge(recorded)
        if status in (401, 403, 404):
            return KeyRejected(status, recorded)
        if status in UNAVAILABLE_STATUSES:
            return Unavailable(
                status, recorded, parse_retry_after(retry_after, now=datetime.now(UTC))
            )
        if status >= 500:
            return Transient(
                status, recorded, parse_retry_after(retry_after, now=datetime.now(UTC))
            )
        return Transient(status, recorded)


def _accepted(ids: object, count: int) -> int:
    """How many of ``count`` events an answer's ids say were ingested: the
    leading non-empty string ids (the server answers ``[""]`` when its first
    event failed: an empty id is no event taken)."""
    if not isinstance(ids, list):
        return 0
    taken = 0
    for value in ids[:count]:
        if not isinstance(value, str) or not value:
            break
        taken += 1
    return taken


async def _read_capped(content: aiohttp.StreamReader, cap: int) -> bytes:
    """The whole body, up to ``cap`` bytes. (One read returns whatever has
    arrived: an answer in several TCP segments would be cut short.)"""
    body = b""
    while len(body) < cap:
        chunk = await content.read(cap - len(body))
        if not chunk:
            break
        body += chunk
    return body


def _json_object(text: str) -> dict[str, object] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
