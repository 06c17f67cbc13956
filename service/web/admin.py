"""The admin API (/admin/api/…) and the admin page (/admin), for admin users.

Both are thin: the rules are operations.py's, the same the CLI follows.
"""

from __future__ import annotations

import html
import secrets
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import sqlalchemy as sa
from aiohttp import web

from .. import auth, operations
from ..keys import DATABASE, WAKE
from ..models import users
from ..operations import Filter, InvalidArgument, Selection
from .body import read_json_object
from .problems import Problem, invalid_field, unauthenticated
from .sessions import current_user

MAX_REPLAY_BODY_BYTES = 256 * 1024
MAX_REPLAY_IDS = 10_000
PAGE_FAILED_ROWS = 100
REFRESH_SECONDS = 15


def _forbidden() -> Problem:
    return Problem(403, "forbidden", "Administrators only", "This needs an admin user.")


async def _admin(request: web.Request) -> auth.User | None:
    """The logged-in user if an admin, None if not logged in; 403 otherwise."""
    user = await current_user(request)
    if user is None:
        return None
    # Read from the database, not the cookie: taking the flag away works at once.
    async with request.app[DATABASE].engine.connect() as conn:
        is_admin = await conn.scalar(sa.select(users.c.is_admin).where(users.c.id == user.id))
    if not is_admin:
        raise _forbidden()
    return user


async def is_admin(request: web.Request) -> bool:
    """Whether the request comes from a logged-in admin."""
    try:
        return await _admin(request) is not None
    except Problem:
        return False


async def _require_admin(request: web.Request) -> auth.User:
    user = await _admin(request)
    if user is None:
        raise unauthenticated()
    return user


def _now() -> datetime:
    return datetime.now(UTC)


# -- API ----------------------------------------------------------------------


async def api_stats(request: web.Request) -> web.Response:
    await _require_admin(request)
    db = request.app[DATABASE]
    now = _now()
    stats = await operations.stats(db, now=now)
    minutes = await operations.timeline(db, now=now, backlog_now=stats.backlog)
    return web.json_response({"stats": stats.as_json(), "timeline": [m.as_json() for m in minutes]})


async def api_list(request: web.Request) -> web.Response:
    await _require_admin(request)
    query = request.query
    try:
        where = _filter(query, _now())
        limit = _int(query.get("limit"), operations.DEFAULT_PAGE, "limit")
        page = await operations.list_events(
            request.app[DATABASE], where, limit=limit, cursor=query.get("cursor") or None
        )
    except InvalidArgument as exc:
        raise Problem(400, "invalid_query", "A query parameter is invalid", str(exc)) from None
    return web.json_response(
        {"events": [e.as_json() for e in page.events], "nextCursor": page.next_cursor}
    )


async def api_event(request: web.Request) -> web.Response:
    await _require_admin(request)
    event = await operations.get_event(request.app[DATABASE], request.match_info["id"])
    if event is None:
        raise Problem(404, "event_not_found", "No such event", "No event with this id.")
    return web.json_response(event.as_json())


async def api_replay(request: web.Request) -> web.Response:
    user = await _require_admin(request)
    body = await read_json_object(request, MAX_REPLAY_BODY_BYTES)
    selection = _selection(body)
    new_ids = _flag(body, "newId")
    dry_run = _flag(body, "dryRun")
    result = await operations.replay(
        request.app[DATABASE],
        selection,
        actor=f"{user.username} (admin)",
        now=_now(),
        new_ids=new_ids,
        dry_run=dry_run,
    )
    if result.replayed:
        request.app[WAKE].set()  # this process's worker; others by NOTIFY or their poll
    return web.json_response(result.as_json())


def _selection(body: dict[str, Any]) -> Selection:
    ids = body.get("ids")
    filters = {k: body.get(k) for k in ("status", "name", "since", "until")}
    if ids is not None:
        if (
            not isinstance(ids, list)
            or not ids
            or len(ids) > MAX_REPLAY_IDS
            or not all(isinstance(i, str) and 0 < len(i) <= 64 for i in ids)
        ):
            raise invalid_field(
                "ids", "type", f"ids must be a list of 1 to {MAX_REPLAY_IDS} event ids."
            )
        if any(v is not None for v in filters.values()):
            raise invalid_field("ids", "exclusive", "Give ids or a filter (status …), not both.")
        return Selection(ids=tuple(ids))
    if filters["status"] not in ("failed", "delivered"):
        raise invalid_field(
            "status", "required", "Give ids, or status 'failed' or 'delivered' to replay by filter."
        )
    for key in ("name", "since", "until"):
        if filters[key] is not None and not isinstance(filters[key], str):
            raise invalid_field(key, "type", f"{key} must be a string.")
    now = _now()
    for key in ("since", "until"):
        if filters[key]:
            try:
                operations.parse_time(filters[key], now=now)
            except InvalidArgument as exc:
                raise invalid_field(key, "format", str(exc)) from None
    return Selection(where=_filter(filters, now))


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise invalid_field(name, "type", f"{name} must be true or false.")
    return value


def _filter(query: Any, now: datetime) -> Filter:
    since, until = query.get("since"), query.get("until")
    return Filter(
        status=operations.parse_status(query.get("status")),
        name=query.get("name") or None,
        since=operations.parse_time(since, now=now) if since else None,
        until=operations.parse_time(until, now=now) if until else None,
    )


def _int(raw: str | None, default: int, name: str) -> int:
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise InvalidArgument(f"{name} must be a whole number") from None


# -- page -----------------------------------------------------------------------


async def page(request: web.Request) -> web.Response:
    nonce = secrets.token_urlsafe(16)
    try:
        user = await _admin(request)
    except Problem:
        return _html(_FORBIDDEN_PAGE, nonce, status=403)
    if user is None:
        return _html(_LOGIN_PAGE, nonce)
    db = request.app[DATABASE]
    now = _now()
    stats = await operations.stats(db, now=now)
    minutes = await operations.timeline(db, now=now, backlog_now=stats.backlog)
    failed = await operations.list_events(
        db, Filter(status=operations.OutboxStatus.FAILED), limit=PAGE_FAILED_ROWS
    )
    body = _ADMIN_PAGE.format(
        user=html.escape(user.username),
        stats=_stats_table(stats),
        chart=chart_svg(minutes),
        failed_count=stats.counts["failed"],
        shown=len(failed.events),
        rows="".join(_failed_row(e) for e in failed.events)
        or '<tr><td colspan="6">No failed events.</td></tr>',
        refresh=REFRESH_SECONDS,
        at=html.escape(now.strftime("%Y-%m-%d %H:%M:%S UTC")),
    )
    return _html(body, nonce)


def _html(body: str, nonce: str, *, status: int = 200) -> web.Response:
    document = _LAYOUT.replace("{nonce}", nonce).replace("{body}", body)
    return web.Response(
        text=document,
        status=status,
        content_type="text/html",
        headers={
            # Only this page's own script and style run; nothing may frame it.
            "Content-Security-Policy": (
                f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
                "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
            ),
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "same-origin",
        },
    )


def _stats_table(stats: operations.Stats) -> str:
    rows = [(status, f"{count:,}") for status, count in stats.counts.items()]
    age = stats.oldest_pending_age_seconds
    rows += [
        ("backlog", f"{stats.backlog:,}"),
        ("oldest waiting", "-" if age is None else f"{age:,.0f} s"),
        ("failures, last hour", f"{stats.failures_last_hour:,}"),
        ("deliveries per minute", f"{stats.deliveries_per_minute:,}"),
    ]
    return "".join(
        f'<tr data-stat="{html.escape(name)}"><th>{html.escape(name)}</th>'
        f"<td>{html.escape(value)}</td></tr>"
        for name, value in rows
    )


def _origin(origin: str | None) -> str:
    """Where an event came from: a relay key's name, or POST /api."""
    return f"key {origin}" if origin is not None else "api"


def _failed_row(event: operations.EventSummary) -> str:
    event_id = html.escape(event.id)
    return (
        f'<tr data-id="{event_id}">'
        f'<td><input type="checkbox" class="pick" value="{event_id}" '
        f'aria-label="select {event_id}"></td>'
        f'<td><a href="/admin/api/events/{html.escape(quote(event.id, safe=""))}">'
        f"<code>{event_id}</code></a></td>"
        f"<td>{html.escape(event.name)}</td>"
        f"<td>{html.escape(_origin(event.origin))}</td>"
        f"<td>{event.attempts}</td>"
        f"<td>{html.escape(event.last_error or '')}</td>"
        f'<td><button class="replay-one" data-id="{event_id}">Replay</button></td>'
        "</tr>"
    )


SERIES = (("delivered", "#2a7d2e"), ("failed", "#c62828"), ("backlog", "#1565c0"))


def chart_svg(minutes: list[operations.Minute], *, width: int = 720, height: int = 180) -> str:
    """Deliveries, failures and backlog per minute as polylines, in plain SVG."""
    pad_left, pad_bottom, pad_top = 48, 20, 10
    plot_w, plot_h = width - pad_left - 8, height - pad_bottom - pad_top
    peak = max([1, *(getattr(m, name) for m in minutes for name, _ in SERIES)])
    step = plot_w / max(len(minutes) - 1, 1)
    lines = []
    for name, colour in SERIES:
        points = " ".join(
            f"{pad_left + i * step:.1f},{pad_top + plot_h - getattr(m, name) / peak * plot_h:.1f}"
            for i, m in enumerate(minutes)
        )
        lines.append(
            f'<polyline class="series-{name}" fill="none" stroke="{colour}" '
            f'stroke-width="1.5" points="{points}"/>'
        )
    legend = "".join(
        f'<text x="{pad_left + 10 + i * 110}" y="{height - 4}" fill="{colour}">{name}</text>'
        for i, (name, colour) in enumerate(SERIES)
    )
    return (
        f'<svg id="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="deliveries, failures and backlog per minute, last hour">'
        f'<line x1="{pad_left}" y1="{pad_top + plot_h}" x2="{width - 8}" y2="{pad_top + plot_h}" '
        f'stroke="#999"/>'
        f'<line x1="{pad_left}" y1="{pad_top}" x2="{pad_left}" y2="{pad_top + plot_h}" '
        f'stroke="#999"/>'
        f'<text x="{pad_left - 4}" y="{pad_top + 10}" text-anchor="end">{peak:,}</text>'
        f'<text x="{pad_left - 4}" y="{pad_top + plot_h}" text-anchor="end">0</text>'
        f'<text x="{width - 8}" y="{height - 4}" text-anchor="end">now</text>'
        f"{legend}{''.join(lines)}</svg>"
    )


_LAYOUT = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>inngest-outbox admin</title>
<style nonce="{nonce}">
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: .5em 0 1.5em; }
th, td { border-bottom: 1px solid #ddd; padding: .3em .6em; text-align: left; vertical-align: top; }
#stats th { font-weight: normal; color: #555; }
svg text { font-size: 11px; }
#message { min-height: 1.4em; font-weight: bold; }
code { white-space: nowrap; }
</style></head>
<body>{body}
<script nonce="{nonce}">
const $ = (selector) => document.querySelector(selector);
const say = (text) => { const m = $("#message"); if (m) m.textContent = text; };
async function post(url, body) {
  const response = await fetch(url, {method: "POST", credentials: "same-origin",
    headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.detail || data.title || response.status);
  return data;
}
const login = $("#login");
if (login) login.addEventListener("submit", async (event) => {
  event.preventDefault();
  try {
    await post("/auth/login", {username: $("#username").value, password: $("#password").value});
    location.reload();
  } catch (error) { say("Login failed: " + error.message); }
});
const logout = $("#logout");
if (logout) logout.addEventListener("click", async () => {
  try { await post("/auth/logout", {}); }
  catch (error) { say("Logout failed: " + error.message); return; }
  location.reload();
});
async function replay(ids) {
  say("Replaying " + ids.length + "…");
  try {
    const result = await post("/admin/api/replay", {ids});
    say("Replayed " + result.replayed.length + " of " + ids.length + ".");
    setTimeout(() => location.reload(), 1000);
  } catch (error) { say("Replay failed: " + error.message); }
}
document.querySelectorAll(".replay-one").forEach((button) =>
  button.addEventListener("click", () => replay([button.dataset.id])));
const many = $("#replay-selected");
if (many) many.addEventListener("click", () => {
  const ids = [...document.querySelectorAll(".pick:checked")].map((box) => box.value);
  if (ids.length) replay(ids); else say("Select events first.");
});
const all = $("#pick-all");
if (all) all.addEventListener("change", () =>
  document.querySelectorAll(".pick").forEach((box) => { box.checked = all.checked; }));
const refresh = document.body.querySelector("[data-refresh]");
if (refresh) setInterval(() => {
  // Not while the operator is choosing what to replay.
  if (!document.querySelector(".pick:checked")) location.reload();
}, 1000 * Number(refresh.dataset.refresh));
</script></body></html>
"""

_LOGIN_PAGE = """<h1>inngest-outbox admin</h1>
<form id="login">
<p><label>User <input id="username" autocomplete="username" required></label></p>
<p><label>Password <input id="password" type="password" autocomplete="current-password"
required></label></p>
<p><button type="submit">Log in</button></p>
</form>
<p id="message" role="status"></p>"""

_FORBIDDEN_PAGE = """<h1>Administrators only</h1>
<p>This user is not an administrator.</p>
<p><button id="logout">Log out</button></p>"""

_ADMIN_PAGE = """<h1>inngest-outbox admin</h1>
<p data-refresh="{refresh}">Logged in as {user} · refreshed {at}, every {refresh} s ·
<button id="logout">Log out</button></p>
<h2>Outbox</h2>
<table id="stats">{stats}</table>
<h2>Last hour, per minute</h2>
{chart}
<h2>Failed events</h2>
<p id="message" role="status"></p>
<p>{shown} of {failed_count} shown, newest first.
<button id="replay-selected">Replay selected</button></p>
<table id="failed">
<thead><tr><th><input type="checkbox" id="pick-all" aria-label="select all"></th>
<th>id</th><th>name</th><th>origin</th><th>attempts</th><th>last error</th><th></th></tr></thead>
<tbody>{rows}</tbody>
</table>"""
