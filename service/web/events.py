"""GET /api/events/{id}: a client's view of an event it posted."""

from __future__ import annotations

import re

from aiohttp import web

from .. import operations
from ..keys import DATABASE
from .problems import Problem, unauthenticated
from .sessions import current_user

_EVENT_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


async def get_event(request: web.Request) -> web.Response:
    user = await current_user(request)
    if user is None:
        raise unauthenticated()
    event_id = request.match_info["id"]
    view = None
    if _EVENT_ID.fullmatch(event_id):
        view = await operations.event_for_user(request.app[DATABASE], event_id, user.id)
    if view is None:
        # Another user's event is "not found" too: ids must not be probed.
        raise Problem(404, "event_not_found", "No such event", "You posted no event with this id.")
    return web.json_response(view)
