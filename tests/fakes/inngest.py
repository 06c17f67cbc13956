"""A stand-in for Inngest's event API that enforces shared/inngest-event-api.md.

It runs as a real aiohttp server on 127.0.0.1, checks the key, the body and
every event as the dev server does (ingesting in order and stopping at the
first invalid event), and records what it accepted, so tests compare ids
exactly. It can be told to misbehave: see ``Fault``.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import json
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

MIB = 1024 * 1024
TS_MIN_MS = 315_532_800_000  # 1980-01-01
TS_MAX_MS = 4_102_444_800_000  # 2100-01-01


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
    RATE_LIMIT = "429"
    DROP = "drop"  # closes the connection without an answer
    GARBAGE_200 = "garbage"  # 200 whose body is not the contract's shape
    REDIRECT = "302"
    TEAPOT = "418"
    FORBIDDEN = "403"  # Cloud: a key of another environment
    NOT_FOUND = "404"
    TRICKLE = "trickle"  # accepts, then answers in two writes 50 ms apart


@dataclass
class StandIn:
    event_key: str = "test-event-key"
    max_event_bytes: int = 3 * MIB
    max_body_bytes: int = 3 * MIB
    max_events: int = 5000
    slow_seconds: float = 5.0
    retry_after: str | None = "1"
    # Events with these ids are refused as invalid (a 400 inside a batch).
    poison_ids: set[str] = field(default_factory=set)
    faults: collections.deque[Fault] = field(default_factory=collections.deque)
    accepted: list[dict[str, Any]] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    # Called with each request's events before it is answered (tests hook in here).
    on_request: Callable[[list[dict[str, Any]]], Any] | None = None
    # Benchmarks turn this off: count what was accepted instead of keeping it.
    keep_events: bool = True
    accepted_count: int = 0
    request_count: int = 0
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes + 1)
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
        return _key_not_found()

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
            return _key_not_found()
        if request.content_type != "application/json":
            return _error(400, "Content-Type must be application/json")
        if len(raw) > self.max_body_bytes:
            return _error(413, "request body too large")
        try:
            body = _parse(raw) if raw else []
        except ValueError:
            return _error(400, "unable to parse the request body as JSON")
        events = body if isinstance(body, list) else [body]
        record["events"] = events
        if len(events) > self.max_events:
            return _error(413, f"too many events: {len(events)} > {self.max_events}")
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

        # json.dumps writes no event longer than six bytes a byte of the body
        # (a character as \uXXXX at most, "1e15" as 18): a small body needs
        # no event measured. (Benchmarks share the machine with it.)
        if len(raw) * 6 > self.max_event_bytes:
            for event in events:
                if len(json.dumps(event).encode()) > self.max_event_bytes:
                    return _error(413, "event too large")
        random = secrets.token_hex(13 * len(events))  # one system call, not one an event
        ids: list[str] = []
        for index, event in enumerate(events):
            problem = self._invalid(event)
            if problem is not None:
                # Partial acceptance: the events before the invalid one are in.
                await self._accept(events[:index])
                return web.json_response({"ids": ids, "status": 400, "error": problem}, status=400)
            ids.append(random[26 * index : 26 * index + 26])
        await self._accept(events)
        if fault is Fault.SLOW:
            await asyncio.sleep(self.slow_seconds)
        if fault is Fault.TRICKLE:
            return await _trickle(request, json.dumps({"ids": ids, "status": 200}).encode())
        return web.json_response({"ids": ids, "status": 200})

    def _invalid(self, event: Any) -> str | None:
        if not isinstance(event, dict):
            return "event must be an object"
        name = event.get("name")
        if not isinstance(name, str) or not name:
            return "event name is required"
        if name.lower().startswith("inngest/"):
            return "event name is reserved for internal use"
        if "data" in event and not isinstance(event["data"], dict):
            return "data must be an object"
        if "id" in event and not isinstance(event["id"], str):
            return "id must be a string"
        if "user" in event and not isinstance(event["user"], dict):
            return "user must be an object"
        if "v" in event and not isinstance(event["v"], str):
            return "v must be a string"
        ts = event.get("ts")
        if ts is not None and (
            not isinstance(ts, int) or isinstance(ts, bool) or not TS_MIN_MS <= ts <= TS_MAX_MS
        ):
            return "ts must be milliseconds since the epoch"
        if event.get("id") in self.poison_ids:
            return f"event {event['id']} is invalid"
        return None

    async def _accept(self, events: list[dict[str, Any]]) -> None:
        async with self._changed:
            self.accepted_count += len(events)
            if self.keep_events:
                self.accepted.extend(events)
            self._changed.notify_all()


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


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"status": status, "error": message}, status=status)


def _key_not_found() -> web.Response:
    return web.json_response(
        {"status": 401, "message": "", "error": "Event key not found"}, status=401
    )


async def _trickle(request: web.Request, body: bytes) -> web.StreamResponse:
    """The answer in two TCP writes with a pause between, as a slow network gives it."""
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = len(body)
    await response.prepare(request)
    await response.write(body[: len(body) // 2])
    await asyncio.sleep(0.05)
    await response.write(body[len(body) // 2 :])
    await response.write_eof()
    return response
