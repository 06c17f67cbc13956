"""What operators do with the outbox: stats, list, show, replay and purge.

One implementation behind the CLI and the admin API, so both follow the same
rules. Reads go through the engine; every write goes through ``outbox``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from . import outbox
from .ids import new_event_id
from .models import documents, outbox_history, users
from .models import outbox as outbox_table
from .outbox import OutboxStatus
from .store.database import Database

MAX_PAGE = 500
DEFAULT_PAGE = 50
REPLAY_BATCH = 500
PURGE_BATCH = 1000
TIMELINE_MINUTES = 60
# "Deliveries per minute" is the average over this many minutes.
RATE_WINDOW_MINUTES = 5
LIST_ERROR_CHARS = 200

Progress = Callable[[int], None]


class InvalidArgument(ValueError):
    """An operator's argument that cannot be used; the message says why."""


# -- arguments ------------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> timedelta:
    """'90s', '15m', '12h', '7d', '2w', or a sum of them ('1d12h')."""
    compact = text.strip().lower()
    parts = _DURATION.findall(compact)
    if not compact or "".join(n + u for n, u in parts) != compact.replace(" ", ""):
        raise InvalidArgument(
            f"{text!r} is not a duration: use a number and a unit, like 90s, 15m, 12h, 7d or 2w"
        )
    try:
        return timedelta(seconds=sum(float(n) * _UNIT_SECONDS[u] for n, u in parts))
    except OverflowError:
        raise InvalidArgument(f"{text!r} is too long a duration") from None


def parse_time(text: str, *, now: datetime) -> datetime:
    """An ISO 8601 time (UTC unless it says otherwise), or a duration meaning that long ago."""
    try:
        age = parse_duration(text)
    except InvalidArgument as exc:
        if "too long" in str(exc):
            raise
    else:
        try:
            return now - age
        except OverflowError:
            raise InvalidArgument(f"{text!r} is too long ago") from None
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise InvalidArgument(
            f"{text!r} is not a time: use ISO 8601 (2026-11-23T10:00:00Z) or an age (2h, 7d)"
        ) from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def parse_status(text: str | None) -> OutboxStatus | None:
    if text is None or text == "":
        return None
    try:
        return OutboxStatus(text)
    except ValueError:
        choices = ", ".join(s.value for s in OutboxStatus)
        raise InvalidArgument(f"{text!r} is not a status: use one of {choices}") from None


# -- stats ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stats:
    counts: dict[str, int]  # rows per status
    backlog: int  # pending + sending
    oldest_pending_age_seconds: float | None  # the oldest row not yet delivered or failed
    failures_last_hour: int  # rows that went to failed in the last hour
    deliveries_per_minute: float  # over the last RATE_WINDOW_MINUTES
    at: datetime

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "at": self.at.isoformat()}


async def stats(db: Database, *, now: datetime, count_delivered: bool = True) -> Stats:
    """Each figure is a query on one state's partial index, so each costs what that
    state holds: the backlog and the failed rows are small. Counting the delivered
    rows reads their whole index (the retained history); /metrics skips it
    (``count_delivered=False``, reported as -1)."""
    waiting = (OutboxStatus.PENDING, OutboxStatus.SENDING)
    async with db.engine.connect() as conn:
        counts = {}
        for status in OutboxStatus:
            if status is OutboxStatus.DELIVERED and not count_delivered:
                counts[status.value] = -1
                continue
            counts[status.value] = await conn.scalar(
                sa.select(sa.func.count()).where(outbox_table.c.status == status)
            )
        oldest_per_state = [
            await conn.scalar(
                sa.select(sa.func.min(outbox_table.c.created_at)).where(
                    outbox_table.c.status == status
                )
            )
            for status in waiting
        ]
        oldest = min((t for t in oldest_per_state if t is not None), default=None, key=_utc)
        failures = await conn.scalar(
            sa.select(sa.func.count()).where(
                outbox_history.c.kind == outbox.HistoryKind.FAILED,
                outbox_history.c.at >= now - timedelta(hours=1),
            )
        )
        recent = await conn.scalar(
            sa.select(sa.func.count()).where(
                outbox_table.c.status == OutboxStatus.DELIVERED,
                outbox_table.c.delivered_at >= now - timedelta(minutes=RATE_WINDOW_MINUTES),
            )
        )
    oldest_age = None if oldest is None else max((now - _utc(oldest)).total_seconds(), 0.0)
    return Stats(
        counts=counts,
        backlog=counts["pending"] + counts["sending"],
        oldest_pending_age_seconds=oldest_age,
        failures_last_hour=failures or 0,
        deliveries_per_minute=round((recent or 0) / RATE_WINDOW_MINUTES, 1),
        at=now,
    )


@dataclass(frozen=True, slots=True)
class Minute:
    start: datetime
    delivered: int
    failed: int
    backlog: int  # rows waiting at the end of the minute

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "start": self.start.isoformat()}


async def timeline(
    db: Database, *, now: datetime, backlog_now: int, minutes: int = TIMELINE_MINUTES
) -> list[Minute]:
    """Deliveries, failures and backlog per minute, oldest minute first.

    The backlog is worked back from today's: each later minute's arrivals are
    taken off and its deliveries and failures put back. Rows replayed or purged
    within the hour make it approximate.
    """
    first = now.replace(second=0, microsecond=0) - timedelta(minutes=minutes - 1)
    async with db.engine.connect() as conn:
        minute = db.minute_of
        delivered = await _per_minute(
            conn,
            minute(outbox_table.c.delivered_at),
            outbox_table.c.status == OutboxStatus.DELIVERED,
            outbox_table.c.delivered_at >= first,
        )
        failed = await _per_minute(
            conn,
            minute(outbox_history.c.at),
            outbox_history.c.kind == outbox.HistoryKind.FAILED,
            outbox_history.c.at >= first,
        )
        arrived: dict[datetime, int] = {}
        # Per state, so that each query reads that state's partial index.
        for status, index_column in (
            (OutboxStatus.PENDING, None),
            (OutboxStatus.SENDING, None),
            (OutboxStatus.FAILED, None),
            (OutboxStatus.DELIVERED, outbox_table.c.delivered_at),
        ):
            conditions = [outbox_table.c.status == status, outbox_table.c.created_at >= first]
            if index_column is not None:
                conditions.append(index_column >= first)
            for start, count in (
                await _per_minute(conn, minute(outbox_table.c.created_at), *conditions)
            ).items():
                arrived[start] = arrived.get(start, 0) + count
    starts = [first + timedelta(minutes=i) for i in range(minutes)]
    backlog = backlog_now
    result = []
    for start in reversed(starts):
        result.append(Minute(start, delivered.get(start, 0), failed.get(start, 0), max(backlog, 0)))
        backlog += delivered.get(start, 0) + failed.get(start, 0) - arrived.get(start, 0)
    result.reverse()
    return result


async def _per_minute(
    conn: AsyncConnection, bucket: sa.ColumnElement[Any], *conditions: sa.ColumnElement[bool]
) -> dict[datetime, int]:
    rows = await conn.execute(
        sa.select(bucket.label("minute"), sa.func.count()).where(*conditions).group_by("minute")
    )
    return {start: count for start, count in rows}


# -- list and show --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Filter:
    status: OutboxStatus | None = None
    name: str | None = None
    since: datetime | None = None  # created at or after
    until: datetime | None = None  # created before

    def conditions(self) -> list[sa.ColumnElement[bool]]:
        conditions = []
        if self.status is not None:
            conditions.append(outbox_table.c.status == self.status)
        if self.name is not None:
            conditions.append(outbox_table.c.event_name == self.name)
        if self.since is not None:
            conditions.append(outbox_table.c.created_at >= self.since)
        if self.until is not None:
            conditions.append(outbox_table.c.created_at < self.until)
        return conditions


@dataclass(frozen=True, slots=True)
class EventSummary:
    id: str
    name: str
    status: str
    attempts: int
    created_at: datetime
    available_at: datetime
    delivered_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    origin: str | None  # the relay key's name that sent it (None: POST /api)

    def as_json(self) -> dict[str, Any]:
        return _json_ready(asdict(self))


@dataclass(frozen=True, slots=True)
class Page:
    events: list[EventSummary]
    next_cursor: str | None  # pass back to get the next page; None on the last


_SUMMARY_COLUMNS = (
    outbox_table.c.id,
    outbox_table.c.event_name,
    outbox_table.c.status,
    outbox_table.c.attempts,
    outbox_table.c.created_at,
    outbox_table.c.available_at,
    outbox_table.c.delivered_at,
    outbox_table.c.last_status_code,
    sa.func.substr(outbox_table.c.last_error, 1, LIST_ERROR_CHARS),
    outbox_table.c.origin,
)


_SMALL_STATES = (OutboxStatus.PENDING, OutboxStatus.SENDING, OutboxStatus.FAILED)


def list_query(where: Filter, *, limit: int, cursor: str | None) -> sa.Select[Any]:
    conditions = where.conditions()
    if cursor:
        conditions.append(outbox_table.c.id < cursor)
    order: sa.ColumnElement[Any] = outbox_table.c.id
    if where.status in _SMALL_STATES:
        # A few rows among many delivered: read them through that state's partial
        # index and sort them, rather than walk the primary key past every
        # delivered row (which SQLite's planner would otherwise choose).
        order = sa.func.coalesce(outbox_table.c.id, "")
    return sa.select(*_SUMMARY_COLUMNS).where(*conditions).order_by(order.desc()).limit(limit)


async def list_events(
    db: Database, where: Filter, *, limit: int = DEFAULT_PAGE, cursor: str | None = None
) -> Page:
    """Newest first, by event id (UUIDv7, so by time of creation).

    Keyset paging on the primary key: a page never repeats or skips a row
    because rows were added or changed meanwhile, and costs the same deep in
    the list as at its start.
    """
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidArgument(f"limit must be between 1 and {MAX_PAGE}")
    query = list_query(where, limit=limit + 1, cursor=cursor)
    async with db.engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    events = [EventSummary(*row) for row in rows[:limit]]
    return Page(events, events[-1].id if len(rows) > limit else None)


@dataclass(frozen=True, slots=True)
class HistoryItem:
    at: datetime
    kind: str
    attempt: int | None
    status_code: int | None
    error: str | None
    actor: str
    detail: str | None

    def as_json(self) -> dict[str, Any]:
        return _json_ready(asdict(self))


@dataclass(frozen=True, slots=True)
class EventDetail:
    id: str
    origin_id: str | None  # the id the client was given, if a replay changed it
    name: str
    status: str
    attempts: int
    created_at: datetime
    available_at: datetime
    delivered_at: datetime | None
    lease_owner: str | None
    lease_expires_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    origin: str | None  # the relay key's name that sent it (None: POST /api)
    event: Any  # the event as sent to Inngest
    document_name: str | None
    user_id: int | None
    username: str | None
    history: list[HistoryItem] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        data = _json_ready(asdict(self))
        data["history"] = [h.as_json() for h in self.history]
        return data


async def get_event(db: Database, event_id: str) -> EventDetail | None:
    """One event by its id, or by the id its client was given before a replay."""
    o = outbox_table
    columns = (
        o.c.id,
        o.c.origin_id,
        o.c.event_name,
        o.c.status,
        o.c.attempts,
        o.c.created_at,
        o.c.available_at,
        o.c.delivered_at,
        o.c.lease_owner,
        o.c.lease_expires_at,
        o.c.last_status_code,
        o.c.last_error,
        o.c.origin,
        sa.cast(o.c.payload, sa.Text),
    )
    async with db.engine.connect() as conn:
        row = (await conn.execute(sa.select(*columns).where(o.c.id == event_id))).first()
        if row is None:
            row = (await conn.execute(sa.select(*columns).where(o.c.origin_id == event_id))).first()
        if row is None:
            return None
        document = (
            await conn.execute(
                sa.select(documents.c.document_name, users.c.id, users.c.username)
                .join(users, users.c.id == documents.c.user_id)
                .where(documents.c.event_id == (row.origin_id or row.id))
            )
        ).first()
        history = [
            HistoryItem(*h)
            for h in await conn.execute(
                sa.select(
                    outbox_history.c.at,
                    outbox_history.c.kind,
                    outbox_history.c.attempt,
                    outbox_history.c.status_code,
                    outbox_history.c.error,
                    outbox_history.c.actor,
                    outbox_history.c.detail,
                )
                .where(outbox_history.c.event_id == row.id)
                .order_by(outbox_history.c.id)
            )
        ]
    return EventDetail(
        *row[:13],
        event=json.loads(row[13]),
        document_name=document[0] if document else None,
        user_id=document[1] if document else None,
        username=document[2] if document else None,
        history=history,
    )


# -- replay and purge -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Selection:
    """What to replay: these ids, or every row a filter matches."""

    ids: tuple[str, ...] = ()
    where: Filter | None = None

    def __post_init__(self) -> None:
        if bool(self.ids) == (self.where is not None):
            raise InvalidArgument("replay takes event ids or a filter (--status), not both")
        if self.where is not None and self.where.status not in outbox.REPLAYABLE:
            raise InvalidArgument("replay --status takes failed or delivered")


@dataclass(slots=True)
class ReplayResult:
    matched: int = 0
    replayed: list[outbox.Replayed] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    dry_run: bool = False
    would_replay: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "dryRun": self.dry_run,
            "matched": self.matched,
            "replayed": [
                {"id": r.id, "newId": r.new_id, "was": r.was.value} for r in self.replayed
            ],
            "wouldReplay": self.would_replay,
            "skipped": [{"id": i, "reason": reason} for i, reason in self.skipped.items()],
        }


async def replay(
    db: Database,
    selection: Selection,
    *,
    actor: str,
    now: datetime,
    new_ids: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> ReplayResult:
    """Put failed (or delivered) rows back to pending, attempts reset, a batch per
    transaction. A dry run reports what would move and moves nothing."""
    result = ReplayResult(dry_run=dry_run)
    async for batch in _batches(db, selection):
        result.matched += len(batch)
        if dry_run:
            statuses = await _statuses(db, batch)
            for event_id in batch:
                status = statuses.get(event_id)
                if status in outbox.REPLAYABLE:
                    result.would_replay.append(event_id)
                else:
                    result.skipped[event_id] = outbox.skip_reason(status)
        else:
            moved, skipped = await db.write(
                lambda conn, ids=batch: outbox.replay(
                    db, conn, ids, actor=actor, now=now, new_id=new_event_id if new_ids else None
                )
            )
            result.replayed.extend(moved)
            result.skipped.update(skipped)
        if progress is not None:
            progress(result.matched)
    return result


async def _batches(db: Database, selection: Selection):  # type: ignore[no-untyped-def]
    if selection.ids:
        unique = list(dict.fromkeys(selection.ids))
        for start in range(0, len(unique), REPLAY_BATCH):
            yield unique[start : start + REPLAY_BATCH]
        return
    assert selection.where is not None
    conditions = selection.where.conditions()
    async with db.engine.connect() as conn:
        # The walk ends at the newest row that matched when it began: a row
        # replayed with a new id (a newer UUIDv7), or one the worker moved back
        # to the filtered state meanwhile, is not taken again in the same replay.
        last = await conn.scalar(sa.select(sa.func.max(outbox_table.c.id)).where(*conditions))
    if last is None:
        return
    after = ""
    while True:
        async with db.engine.connect() as conn:
            ids = list(
                await conn.scalars(
                    sa.select(outbox_table.c.id)
                    .where(*conditions, outbox_table.c.id > after, outbox_table.c.id <= last)
                    .order_by(outbox_table.c.id)
                    .limit(REPLAY_BATCH)
                )
            )
        if not ids:
            return
        yield ids
        after = ids[-1]


async def _statuses(db: Database, ids: Sequence[str]) -> dict[str, str]:
    async with db.engine.connect() as conn:
        rows = await conn.execute(
            sa.select(outbox_table.c.id, outbox_table.c.status).where(outbox_table.c.id.in_(ids))
        )
        return {row.id: row.status for row in rows}


@dataclass(frozen=True, slots=True)
class PurgeResult:
    delivered: int
    failed: int
    dry_run: bool

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


async def purge(
    db: Database,
    *,
    now: datetime,
    delivered_older_than: timedelta | None = None,
    failed_older_than: timedelta | None = None,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> PurgeResult:
    """Delete delivered rows delivered, and failed rows created, longer ago than
    given, in small batches. Pending and sending rows are never deleted."""
    if delivered_older_than is None and failed_older_than is None:
        raise InvalidArgument("purge needs --delivered-older-than or --failed-older-than")
    counts = {"delivered": 0, "failed": 0}
    plans = []
    if delivered_older_than is not None:
        plans.append(("delivered", now - delivered_older_than))
    if failed_older_than is not None:
        plans.append(("failed", now - failed_older_than))
    for status, before in plans:
        if dry_run:
            column = (
                outbox_table.c.delivered_at if status == "delivered" else outbox_table.c.created_at
            )
            async with db.engine.connect() as conn:
                counts[status] = int(
                    await conn.scalar(
                        sa.select(sa.func.count()).where(
                            outbox_table.c.status == status, column < before
                        )
                    )
                    or 0
                )
            continue
        delete = outbox.purge_delivered if status == "delivered" else outbox.purge_failed
        while deleted := await delete(db, before=before, batch=PURGE_BATCH):
            counts[status] += deleted
            if progress is not None:
                progress(counts["delivered"] + counts["failed"])
    return PurgeResult(counts["delivered"], counts["failed"], dry_run)


# -- the client's own view ----------------------------------------------------------


async def event_for_user(db: Database, event_id: str, user_id: int) -> dict[str, Any] | None:
    """What a client may see of an event it posted, by the id it was given or the
    id a replay gave it; None for anyone else's (or none)."""
    o = outbox_table
    columns = (o.c.id, o.c.origin_id, o.c.status, o.c.delivered_at, o.c.attempts, o.c.last_error)
    async with db.engine.connect() as conn:
        row = (await conn.execute(sa.select(*columns).where(o.c.id == event_id))).first()
        if row is None:
            row = (await conn.execute(sa.select(*columns).where(o.c.origin_id == event_id))).first()
        # The document keeps the id the client was first given.
        first_id = row.origin_id if row is not None and row.origin_id else event_id
        document = (
            await conn.execute(
                sa.select(documents.c.document_name, documents.c.created_at).where(
                    documents.c.event_id == first_id, documents.c.user_id == user_id
                )
            )
        ).first()
    if document is None:
        return None
    view: dict[str, Any] = {
        "id": event_id,
        "documentName": document.document_name,
        "createdAt": _utc(document.created_at).isoformat(),
    }
    if row is None:
        # Only retention (delivered rows) and an operator's purge remove rows.
        view["status"] = "purged"
        return view
    view["status"] = row.status
    if row.id != event_id:
        view["replayedAs"] = row.id
    if row.status == OutboxStatus.DELIVERED:
        view["deliveredAt"] = _utc(row.delivered_at).isoformat()
    elif row.last_error is not None:
        view["attempts"] = row.attempts
        view["error"] = row.last_error
    return view


# -- helpers --------------------------------------------------------------------


def _utc(value: datetime | str) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _json_ready(data: dict[str, Any]) -> dict[str, Any]:
    """datetimes as ISO 8601 text and keys in camelCase, as the HTTP API speaks."""
    out = {}
    for key, value in data.items():
        head, *rest = key.split("_")
        name = head + "".join(part.title() for part in rest)
        out[name] = _utc(value).isoformat() if isinstance(value, datetime) else value
    return out
