"""A stand-in for Inngest's event API that answers as the real server does.

It runs as a real aiohttp server on 127.0.0.1 and records what it accepted, so
tests compare ids exactly. Every answer below is read from the open-source
server's source, inngest/inngest at 253303cdffec27f6c70e208114305326baaa5dd7
(the contract in shared/inngest-event-api.md):

- ``pkg/api/api.go`` ``ReceiveEvent`` (lines 147-308): the key is checked
  first (401 ``{"status": 401, "message": "", "error": "Event key not found"}``
  through ``writeResponse``, ``pkg/api/util.go``, JSON content type, newline).
  Then the body is streamed event by event and each event is handled in order;
  the FIRST error of any kind stops the request and is answered 400
  ``{"ids": ids[0:max+1], "status": 400, "error": err.Error()}``, where ``max``
  is the highest index handled: after k >= 1 accepted events ``ids`` holds
  their k ids, and when the first event fails it is ``[""]``. A success is 200
  ``{"ids": [...], "status": 200}`` (an empty body: ``[""]`` too). Both come
  from ``json.NewEncoder`` (compact, HTML characters escaped, a newline) with
  no Content-Type set, so Go's sniffing names them ``text/plain;
  charset=utf-8``.
- The errors, each kept here with its message:
  ``pkg/eventstream/eventstream.go`` ``ParseStream``: a body that is neither an
  object nor an array (``ErrInvalidRequestBody``), an event over
  ``consts.AbsoluteMaxEventSize`` = 3 MiB counted on its raw bytes
  (``ErrEventTooLarge``, "Event is over the max size: Max %d bytes / Size %d
  bytes"), and JSON syntax errors of the stream decoder;
  ``pkg/eventstream/errors.go`` ``ErrEventCount`` past ``consts.MaxEvents`` =
  5,000 ("Cannot have more than 5000 events in a batch");
  ``json.Unmarshal`` into ``event.Event`` (``pkg/event/event.go``): a field of
  the wrong type ("json: cannot unmarshal <kind> into Go struct field
  raw.<field> of type <type>"; keys match case-insensitively, null leaves a
  field unset); ``pkg/event/inbound.go`` ``NormalizeInbound``: a name starting
  with ``inngest/`` in any case ("event name is reserved for internal use:
  <name>"), a missing ``ts`` (0) set to now; ``pkg/event/event.go``
  ``Validate``: "event name is empty", "timestamp is before Jan 1, 1980",
  "timestamp is after Jan 1, 2100".
- The server's OWN failures are 400 too: ``ReceiveEvent`` returns whatever the
  event handler returns, and the handler (``pkg/api/service.go``
  ``handleEvent``, ``pkg/devserver/service.go`` ``HandleEvent``) fails when its
  queue does: ``pkg/pubsub/broker.go`` ``Publish`` wraps it as "error publishing
  event: ...". ``queue_down`` and ``Fault.QUEUE_ERROR`` answer that way.
- Not modelled: ``meta.sessions`` (``pkg/event/sessions.go``), multipart and
  form bodies, a missing key (chi's route).

Inngest Cloud's source is not public; its documented differences are a mode of
their own (``cloud=True``): a request or an event too large, or too many
events, is 413 and takes nothing; ``Fault.RATE_LIMIT`` is its 429 with
Retry-After.

Tests make it misbehave in the ways the network and servers do: see ``Fault``.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import json
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

MIB = 1024 * 1024
MAX_EVENT_BYTES = 3 * MIB  # consts.AbsoluteMaxEventSize
MAX_EVENTS = 5000  # consts.MaxEvents
TS_MIN_MS = 315_532_800_000  # 1980-01-01, pkg/event/event.go startTimestamp
TS_MAX_MS = 4_102_444_800_000  # 2100-01-01, endTimestamp

# What handleEvent's publish failure reads like (the wrapper is broker.go's;
# the cause is the queue's own, here a Redis that is down).
QUEUE_ERROR = "error publishing event: dial tcp 127.0.0.1:6379: connect: connection refused"
QUEUE_TIMEOUT = "error publishing event: context deadline exceeded"
# Poison events (``poison_ids``) break this rule of Validate.
POISON_ERROR = "timestamp is after Jan 1, 2100"


@dataclass
class Hold:
    """Requests wait at the stand-in until released (answers in flight, on demand)."""

    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    released: asyncio.Event = field(default_factory=asyncio.Event)

    def release(self) -> None:
        self.released.set()


class Fault(enum.Enum):
    ERROR_500 = "500"
    ERROR_503 = "503"
    SLOW = "slow"  # accepts, then answers after ``slow_seconds``
    RATE_LIMIT = "429"  # Cloud's rate limit
    DROP = "drop"  # closes the connection without an answer
    GARBAGE_200 = "garbage"  # 200 whose body is not the contract's shape
    REDIRECT = "302"
    TEAPOT = "418"
    FORBIDDEN = "403"  # Cloud: a key of another environment
    NOT_FOUND = "404"
    TRICKLE = "trickle"  # accepts, then answers in two writes 50 ms apart
    # The server's queue times out on the event at ``queue_fault_at``: the
    # events before it are accepted, the request is answered 400.
    QUEUE_ERROR = "queue"


class _Refused(Exception):
    """The request stops here: answered 400 (413 in Cloud mode) with ``error``."""

    def __init__(self, error: str, *, too_large: bool = False) -> None:
        super().__init__(error)
        self.error = error
        self.too_large = too_large


@dataclass
class StandIn:
    event_key: str = "test-event-key"
    max_event_bytes: int = MAX_EVENT_BYTES
    # Cloud's limit on a whole request; the open-source server has none.
    max_body_bytes: int | None = None
    max_events: int = MAX_EVENTS
    # Inngest Cloud: sizes and counts over the limits are 413, not 400.
    cloud: bool = False
    slow_seconds: float = 5.0
    retry_after: str | None = "1"
    # Events with these ids are refused as invalid (POISON_ERROR): the outbox
    # checks every rule before it stores an event, so tests need this to reach
    # a refusal.
    poison_ids: set[str] = field(default_factory=set)
    # The server's queue is down: every event's publish fails (QUEUE_ERROR).
    queue_down: bool = False
    # Where in a request Fault.QUEUE_ERROR strikes (0: the first event).
    queue_fault_at: int = 0
    faults: collections.deque[Fault] = field(default_factory=collections.deque)
    accepted: list[dict[str, Any]] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    # Called with each request's events before it is answered (tests hook in here).
    on_request: Callable[[list[dict[str, Any]]], Any] | None = None
    # Benchmarks turn this off: count what was accepted instead of keeping it.
    keep_events: bool = True
    accepted_count: int = 0
    request_count: int = 0
    queue_refusals: int = 0  # requests answered with a failure of the queue
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def app(self) -> web.Application:
        # The open-source server reads bodies of any size; aiohttp needs a bound.
        limit = self.max_body_bytes or self.max_events * self.max_event_bytes
        app = web.Application(client_max_size=limit + 1)
        app.router.add_post("/e/{key}", self._ingest)
        app.router.add_post("/e/", self._no_key)
        app.router.add_get("/_stats", self._stats)
        return app

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response({"accepted": self.accepted_count, "requests": self.request_count})

    # -- what tests read ------------------------------------------------------

    @property
    def accepted_ids(self) -> list[str]:
        return [e["id"] for e in self.accepted if "id" in e]

    def accepted_counts(self) -> collections.Counter[str]:
        return collections.Counter(self.accepted_ids)

    async def received(self, count: int) -> list[dict[str, Any]]:
        """Wait until ``count`` events in all have been accepted."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.accepted_count >= count)
        return self.accepted

    async def wait_until(self, predicate: Callable[[StandIn], bool]) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: predicate(self))

    async def requested(self, count: int) -> list[dict[str, Any]]:
        """Wait until ``count`` requests in all have arrived."""
        async with self._changed:
            await self._changed.wait_for(lambda: len(self.requests) >= count)
        return self.requests

    def hold_requests(self) -> Hold:
        """From now on every request waits, after it arrived, until ``release()``."""
        hold = Hold()

        async def wait(events: list[dict[str, Any]]) -> None:
            hold.arrived.set()
            await hold.released.wait()

        self.on_request = wait
        return hold

    def fail_next(self, fault: Fault, times: int = 1) -> None:
        self.faults.extend([fault] * times)

    # -- the contract ---------------------------------------------------------

    async def _no_key(self, request: web.Request) -> web.Response:
        return _api_response(401, "Event key is required")

    async def _ingest(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        fault = self.faults.popleft() if self.faults else None
        record: dict[str, Any] = {
            "headers": dict(request.headers),
            "bytes": len(raw),
            "fault": fault,
        }
        try:
            return await self._answer(request, raw, fault, record)
        finally:
            async with self._changed:
                self.request_count += 1
                if self.keep_events:
                    self.requests.append(record)
                self._changed.notify_all()

    async def _answer(
        self, request: web.Request, raw: bytes, fault: Fault | None, record: dict[str, Any]
    ) -> web.StreamResponse:
        if request.match_info["key"] != self.event_key:
            return _api_response(401, "Event key not found")
        if self.max_body_bytes is not None and len(raw) > self.max_body_bytes:
            return _error(413, "request body too large")
        events, stream_error = self._read_stream(raw)
        record["events"] = events
        if self.cloud and stream_error is not None and stream_error.too_large:
            return _error(413, stream_error.error)  # before anything is taken
        if self.on_request is not None:
            result = self.on_request(events)
            if asyncio.iscoroutine(result):
                await result

        match fault:
            case Fault.ERROR_500:
                return _error(500, "internal error")
            case Fault.ERROR_503:
                return _error(503, "unavailable")
            case Fault.RATE_LIMIT:
                headers = {"Retry-After": self.retry_after} if self.retry_after else {}
                return web.json_response(
                    {"status": 429, "error": "rate limited"}, status=429, headers=headers
                )
            case Fault.DROP:
                assert request.transport is not None
                request.transport.abort()
                return web.Response()
            case Fault.GARBAGE_200:
                return web.Response(text="<html>ok</html>", content_type="text/html")
            case Fault.REDIRECT:
                return web.Response(status=302, headers={"Location": "/elsewhere"})
            case Fault.TEAPOT:
                return _error(418, "teapot")
            case Fault.FORBIDDEN:
                return _error(403, "event key is for another environment")
            case Fault.NOT_FOUND:
                return _error(404, "environment not found")
            case _:
                pass

        ids = _new_ids(len(events))
        for index, event in enumerate(events):
            problem = self._handle(event, index, fault)
            if problem is not None:
                return await self._stop(events, ids, index, problem)
        if stream_error is not None:
            return await self._stop(events, ids, len(events), stream_error)
        await self._accept(events)
        if fault is Fault.SLOW:
            await asyncio.sleep(self.slow_seconds)  # the fault itself: a slow answer
        body = _encode({"ids": ids or [""], "status": 200})
        if fault is Fault.TRICKLE:
            return await _trickle(request, body)
        return web.Response(body=body, headers=_GO_SNIFFED)

    async def _stop(
        self, events: list[Any], ids: list[str], index: int, problem: _Refused
    ) -> web.Response:
        """The first error ends the request: the events before it are in."""
        await self._accept(events[:index])
        return _event_api_response(400, ids[:index] or [""], problem.error)

    def _read_stream(self, raw: bytes) -> tuple[list[Any], _Refused | None]:
        """The events ParseStream hands on before it stops, and why it stopped."""
        if not raw.strip():
            return [], None
        try:
            body = _parse(raw)
        except ValueError:
            return _read_prefix(raw)
        if isinstance(body, dict):
            if len(raw) > self.max_event_bytes:
                return [], self._too_large(len(raw))
            return [body], None
        if not isinstance(body, list):
            return [], _Refused(INVALID_BODY)
        if len(raw) > self.max_event_bytes:
            # Only a body this large can hold an event this large: measure each
            # event's raw bytes as the server does (benchmarks skip the cost).
            sizes = _raw_sizes(raw)[: self.max_events]
            for index, size in enumerate(sizes):
                if size > self.max_event_bytes:
                    return body[:index], self._too_large(size)
        if len(body) > self.max_events:
            return body[: self.max_events], _Refused(
                f"Cannot have more than {self.max_events} events in a batch", too_large=True
            )
        return body, None

    def _too_large(self, size: int) -> _Refused:
        return _Refused(
            f"Event is over the max size: Max {self.max_event_bytes} bytes / Size {size} bytes",
            too_large=True,
        )

    def _handle(self, event: Any, index: int, fault: Fault | None) -> _Refused | None:
        """json.Unmarshal, NormalizeInbound and the handler's publish, for one event."""
        problem = _unmarshal_error(event)
        if problem is not None:
            return _Refused(problem)
        event = event if isinstance(event, dict) else {}
        name = _field(event, "name") or ""
        if name.lower().startswith("inngest/"):
            return _Refused(f"event name is reserved for internal use: {name}")
        if not name:
            return _Refused("event name is empty")
        ts = _field(event, "ts") or 0
        if ts != 0 and ts < TS_MIN_MS:
            return _Refused("timestamp is before Jan 1, 1980")
        if ts != 0 and ts > TS_MAX_MS:
            return _Refused("timestamp is after Jan 1, 2100")
        if self.poison_ids and _field(event, "id") in self.poison_ids:
            return _Refused(POISON_ERROR)
        if self.queue_down:
            self.queue_refusals += 1
            return _Refused(QUEUE_ERROR)
        if fault is Fault.QUEUE_ERROR and index == self.queue_fault_at:
            self.queue_refusals += 1
            return _Refused(QUEUE_TIMEOUT)
        return None

    async def _accept(self, events: list[Any]) -> None:
        async with self._changed:
            self.accepted_count += len(events)
            if self.keep_events:
                self.accepted.extend(events)
            self._changed.notify_all()


INVALID_BODY = "Request body must contain an event object or an array of event objects"

# event.Event's fields as encoding/json decodes them: (Go type, JSON kinds it takes).
_FIELDS: dict[str, tuple[str, tuple[type, ...]]] = {
    "id": ("string", (str,)),
    "name": ("string", (str,)),
    "data": ("map[string]interface {}", (dict,)),
    "ts": ("int64", (int,)),
    "v": ("string", (str,)),
    "user": ("map[string]interface {}", (dict,)),
}
_INT64 = range(-(2**63), 2**63)


def _kind(value: Any) -> str:
    """encoding/json's name for a JSON value in an UnmarshalTypeError."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return f"number {json.dumps(value)}"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _unmarshal_error(event: Any) -> str | None:
    if event is None:
        return None  # null into a struct: nothing set, the name is then empty
    if not isinstance(event, dict):
        kind = _kind(event).split(" ")[0]
        return f"json: cannot unmarshal {kind} into Go value of type event.raw"
    for key, value in event.items():
        spec = _FIELDS.get(key.lower())
        if spec is None or value is None:
            continue
        go_type, kinds = spec
        if (
            isinstance(value, bool)
            or not isinstance(value, kinds)
            or (go_type == "int64" and value not in _INT64)
        ):
            return f"json: cannot unmarshal {_kind(value)} into Go struct field raw.{key.lower()} of type {go_type}"  # noqa: E501
    return None


def _field(event: dict[str, Any], name: str) -> Any:
    """A field as Go reads it: keys match in any case, the last one wins."""
    found = None
    for key, value in event.items():
        if key.lower() == name and value is not None:
            found = value
    return found


def _read_prefix(raw: bytes) -> tuple[list[Any], _Refused]:
    """A body that is not whole JSON: the events the stream decoder read before
    the bad byte, and a syntax error in encoding/json's words."""
    text = raw.decode("utf-8", "replace")
    decoder = json.JSONDecoder()
    at = _skip_space(text, 0)
    if text[at] not in "[{":
        return [], _Refused(INVALID_BODY)
    if text[at] == "{":
        return [], _syntax_error(text, at)
    events: list[Any] = []
    at = _skip_space(text, at + 1)
    while at < len(text) and text[at] != "]":
        try:
            event, at = decoder.raw_decode(text, at)
        except ValueError as exc:
            return events, _syntax_error(text, getattr(exc, "pos", at))
        events.append(event)
        at = _skip_space(text, at)
        if at < len(text) and text[at] == ",":
            at = _skip_space(text, at + 1)
        elif at < len(text) and text[at] != "]":
            return events, _Refused(f"invalid character {text[at]!r} after array element")
    if at >= len(text):
        return events, _Refused("unexpected EOF")
    return events, None


def _syntax_error(text: str, at: int) -> _Refused:
    if at >= len(text):
        return _Refused("unexpected EOF")
    return _Refused(f"invalid character {text[at]!r} looking for beginning of value")


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at] in " \t\r\n":
        at += 1
    return at


def _raw_sizes(raw: bytes) -> list[int]:
    """Each array element's length in the body's own bytes, as json.RawMessage has it."""
    text = raw.decode("utf-8")
    decoder = json.JSONDecoder()
    sizes: list[int] = []
    at = _skip_space(text, text.index("[") + 1)
    while at < len(text) and text[at] != "]":
        _, end = decoder.raw_decode(text, at)
        sizes.append(len(text[at:end].encode()))
        at = _skip_space(text, end)
        if at < len(text) and text[at] == ",":
            at = _skip_space(text, at + 1)
    return sizes


# Crockford's base32, as in the server's ULIDs (github.com/oklog/ulid).
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_TO_CROCKFORD = bytes((_CROCKFORD * 8).encode())


def _new_ids(count: int) -> list[str]:
    """Internal ids as the server makes them: a ULID an event (48 bits of
    milliseconds, then random), from one random read a request."""
    if not count:
        return []
    ms = int(time.time() * 1000)
    stamp = "".join(_CROCKFORD[(ms >> shift) & 31] for shift in range(45, -1, -5))
    noise = secrets.token_bytes(16 * count).translate(_TO_CROCKFORD).decode()
    return [stamp + noise[16 * i : 16 * i + 16] for i in range(count)]


# 19 digits or more: an integer orjson may read as a float (past 2**64, or
# below -2**63) where json keeps it exact.
_LONG_NUMBER = re.compile(rb"[0-9]{19}")


def _parse(raw: bytes) -> Any:
    """JSON as json.loads reads it, in a tenth of the time where orjson reads it
    the same: not NaN, infinities or lone surrogates (orjson refuses them) nor
    long integers. (Nesting of about 980 to 1023 levels, where json.loads ran
    out of stack, orjson reads.)"""
    if _LONG_NUMBER.search(raw):
        return json.loads(raw)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


# ReceiveEvent sets no Content-Type: Go's net/http sniffs the body's first bytes.
_GO_SNIFFED = {"Content-Type": "text/plain; charset=utf-8"}


def _encode(value: Any) -> bytes:
    """json.NewEncoder(w).Encode: compact, <, > and & escaped, a newline."""
    text = json.dumps(value, separators=(",", ":"))
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return text.encode() + b"\n"


def _event_api_response(status: int, ids: list[str], error: str) -> web.Response:
    return web.Response(
        status=status,
        body=_encode({"ids": ids, "status": status, "error": error}),
        headers=_GO_SNIFFED,
    )


def _api_response(status: int, error: str) -> web.Response:
    """writeResponse (pkg/api/util.go): apiResponse with a JSON content type."""
    body = _encode({"status": status, "message": "", "error": error})
    return web.Response(status=status, body=body, content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    """An answer from something in front of the event API (a proxy, Cloud's edge)."""
    return web.json_response({"status": status, "error": message}, status=status)


async def _trickle(request: web.Request, body: bytes) -> web.StreamResponse:
    """The answer in two TCP writes with a pause between, as a slow network gives it."""
    response = web.StreamResponse(headers=_GO_SNIFFED)
    response.content_length = len(body)
    await response.prepare(request)
    await response.write(body[: len(body) // 2])
    await asyncio.sleep(0.05)  # the fault itself: the network's pause
    await response.write(body[len(body) // 2 :])
    await response.write_eof()
    return response
