"""POST /e/{key}: Inngest's event API, so that any Inngest SDK sends through the outbox.

An SDK pointed here by INNGEST_EVENT_API_BASE_URL sends as it would to
Inngest; the answer comes once the request's events are committed, in
Inngest's own shape (``{"ids": [...], "status": 200}``, errors as
``{"error": ..., "status": ...}``), not problem+json: the SDKs read that shape.
The key is in the path: it is never logged (see middlewares.shown_path).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from .. import relay
from ..intake import IntakeClosed, Overloaded, RelayRequest, StorageUnavailable
from ..keys import INTAKE, METRICS, RELAY_KEYS, SETTINGS
from .body import BodyTooLarge, BodyTooSlow, read_body

RETRY_AFTER_SECONDS = "1"


async def receive_events(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    # The key first, as Inngest does: a wrong key learns nothing of the body's faults.
    origin = await request.app[RELAY_KEYS].origin_of(request.match_info["key"])
    if origin is None:
        return _answer(401, error="Event key not found")
    limit = settings.relay_max_body_bytes
    try:
        raw = await read_body(request, limit)
    except BodyTooLarge:
        return _answer(413, error=f"Request body is over the max size of {limit} bytes", ids=[])
    except BodyTooSlow:
        response = _answer(408, error="The request body did not arrive in time")
        response.force_close()  # the rest of the body must not be read as a request
        return response
    received_at = datetime.now(UTC)
    try:
        events = relay.read_events(
            raw,
            origin=origin,
            seed=relay.parse_seed(request.headers.get(relay.SEED_HEADER)),
            received_at=received_at,
            max_event_bytes=settings.max_event_bytes,
        )
    except relay.Refused as refused:
        return _answer(400, error=refused.error, ids=[])
    received, stored = request.app[METRICS].relay_counters(origin)
    received.inc(len(events))
    if not events:
        # As Inngest answers no events: its ReceiveEvent returns ids[0:max+1]
        # of a slice of empty strings, max starting at 0 (pkg/api/api.go).
        return _answer(200, ids=[""])
    try:
        relayed = await request.app[INTAKE].relay(RelayRequest(origin, events, received_at))
    except Overloaded:
        # 5xx: the SDKs retry it, with the same ids.
        return _answer(
            503,
            error="Too many requests in flight; retry shortly",
            headers={"Retry-After": RETRY_AFTER_SECONDS},
        )
    except (StorageUnavailable, IntakeClosed):
        return _answer(503, error="The database is unavailable; nothing was stored")
    stored.inc(relayed.stored)
    return _answer(200, ids=[e.id for e in events])


def _answer(status: int, *, headers: dict[str, str] | None = None, **fields: Any) -> web.Response:
    body = orjson.dumps({**fields, "status": status})
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)
