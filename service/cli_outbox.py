"""The operators' commands: status, list, show, replay, purge.

Tables for people, ``--json`` for scripts. The rules are operations.py's, shared
with the admin API; this module parses arguments and prints.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import socket
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from . import migrate, operations
from .config import Settings
from .operations import Filter, InvalidArgument, Selection
from .store import open_database
from .store.database import Database

REPLAY_HELP = """\
Put failed (or delivered) events back to pending, with their attempts reset, and
record who replayed them and when.

By default an event keeps its id. That is right for failed events: they never
reached Inngest. A replayed *delivered* event with its old id is de-duplicated
by Inngest if it was accepted within the last 24 hours, so its functions do not
run again; pass --new-id to give replayed events fresh ids (the old id is kept
in the event's history, and the client's id still finds it) when they must.
"""


def add_commands(commands: Any) -> None:
    """Register the operators' subcommands on the main parser's subparsers."""
    status = commands.add_parser(
        "status", help="the outbox at a glance: rows per status, backlog age, rates"
    )
    _json_flag(status)
    status.set_defaults(func=_sync(cmd_status))

    listing = commands.add_parser("list", help="list events, newest first, a page at a time")
    _filter_arguments(listing)
    listing.add_argument(
        "--limit",
        type=int,
        default=operations.DEFAULT_PAGE,
        help=f"events per page, 1 to {operations.MAX_PAGE} (default {operations.DEFAULT_PAGE})",
    )
    listing.add_argument("--cursor", help="where the previous page ended (it prints this)")
    _json_flag(listing)
    listing.set_defaults(func=_sync(cmd_list))

    show = commands.add_parser("show", help="one event in full, with every attempt's outcome")
    show.add_argument("id", help="the event id (or the id a client was given before a replay)")
    _json_flag(show)
    show.set_defaults(func=_sync(cmd_show))

    replay = commands.add_parser(
        "replay",
        help="send failed (or delivered) events again",
        description=REPLAY_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    replay.add_argument("ids", nargs="*", metavar="ID", help="event ids to replay")
    _filter_arguments(replay, statuses="failed or delivered")
    replay.add_argument(
        "--new-id",
        action="store_true",
        help="give the replayed events fresh ids, so that Inngest runs their functions again",
    )
    replay.add_argument("--dry-run", action="store_true", help="show what would move; move nothing")
    replay.add_argument(
        "--by", help="who is replaying, for the history (default: user@host of this shell)"
    )
    _json_flag(replay)
    replay.set_defaults(func=_sync(cmd_replay))

    purge = commands.add_parser(
        "purge",
        help="delete delivered (or failed) rows older than an age, in small batches",
        description="Delete outbox rows, a batch per transaction. Pending and sending rows "
        "are never deleted; failed rows only when asked for by --failed-older-than.",
    )
    purge.add_argument(
        "--delivered-older-than", metavar="AGE", help="delivered more than AGE ago (7d, 12h, …)"
    )
    purge.add_argument(
        "--failed-older-than", metavar="AGE", help="failed rows created more than AGE ago"
    )
    purge.add_argument("--dry-run", action="store_true", help="count what would go; delete nothing")
    _json_flag(purge)
    purge.set_defaults(func=_sync(cmd_purge))


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def _filter_arguments(parser: argparse.ArgumentParser, statuses: str | None = None) -> None:
    states = statuses or "pending, sending, delivered, failed"
    parser.add_argument("--status", help=f"only rows in this state ({states})")
    parser.add_argument("--name", help="only events with this name")
    parser.add_argument(
        "--since", metavar="T", help="created at or after T (ISO 8601, or an age such as 2h)"
    )
    parser.add_argument("--until", metavar="T", help="created before T (ISO 8601, or an age)")


def _filter(args: argparse.Namespace, now: datetime) -> Filter:
    return Filter(
        status=operations.parse_status(args.status),
        name=args.name,
        since=operations.parse_time(args.since, now=now) if args.since else None,
        until=operations.parse_time(args.until, now=now) if args.until else None,
    )


Command = Callable[[argparse.Namespace, Database], Awaitable[int]]


def _sync(command: Command) -> Callable[[argparse.Namespace, Settings], int]:
    def run(args: argparse.Namespace, settings: Settings) -> int:
        migrate.require_schema_at_head(settings.database_url)

        async def with_database() -> int:
            async with open_database(settings.database_url) as db:
                return await command(args, db)

        return asyncio.run(with_database())

    return run


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def _progress(verb: str) -> Callable[[int], None]:
    def report(count: int) -> None:
        print(f"{verb} {count} rows…", file=sys.stderr, flush=True)

    return report


# -- commands -------------------------------------------------------------------


async def cmd_status(args: argparse.Namespace, db: Database) -> int:
    stats = await operations.stats(db, now=datetime.now(UTC))
    if args.json:
        _print_json(stats.as_json())
        return 0
    rows = [(status, f"{count:,}") for status, count in stats.counts.items()]
    rows += [
        ("backlog (pending + sending)", f"{stats.backlog:,}"),
        ("oldest waiting", _age(stats.oldest_pending_age_seconds)),
        ("failures in the last hour", f"{stats.failures_last_hour:,}"),
        (
            "deliveries per minute",
            f"{stats.deliveries_per_minute:,} (last {operations.RATE_WINDOW_MINUTES} min)",
        ),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


async def cmd_list(args: argparse.Namespace, db: Database) -> int:
    page = await operations.list_events(
        db, _filter(args, datetime.now(UTC)), limit=args.limit, cursor=args.cursor
    )
    if args.json:
        _print_json({"events": [e.as_json() for e in page.events], "nextCursor": page.next_cursor})
        return 0
    _table(
        ["ID", "NAME", "ORIGIN", "STATUS", "ATTEMPTS", "CREATED", "LAST ERROR"],
        [
            [
                e.id,
                e.name,
                _origin(e.origin),
                e.status,
                str(e.attempts),
                _time(e.created_at),
                _one_line(e.last_error or "", 60),
            ]
            for e in page.events
        ],
    )
    if page.next_cursor:
        print(f"\nmore: add --cursor {page.next_cursor}")
    return 0


async def cmd_show(args: argparse.Namespace, db: Database) -> int:
    event = await operations.get_event(db, args.id)
    if event is None:
        print(f"inngest-outbox: no event {args.id!r} in the outbox", file=sys.stderr)
        return 1
    if args.json:
        _print_json(event.as_json())
        return 0
    fields = [
        ("id", event.id),
        ("client's id", event.origin_id),
        ("name", event.name),
        ("origin", _origin(event.origin)),
        ("status", event.status),
        ("attempts", str(event.attempts)),
        ("created", _time(event.created_at)),
        ("next attempt" if event.status == "pending" else "available", _time(event.available_at)),
        ("delivered", _time(event.delivered_at) if event.delivered_at else None),
        ("leased to", event.lease_owner),
        ("lease expires", _time(event.lease_expires_at) if event.lease_expires_at else None),
        ("last status code", str(event.last_status_code) if event.last_status_code else None),
        ("last error", event.last_error),
        ("document", event.document_name),
        ("user", f"{event.username} (id {event.user_id})" if event.username else None),
    ]
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        if value is not None:
            print(f"{name:<{width}}  {value}")
    print("\nevent:")
    print(json.dumps(event.event, indent=2, ensure_ascii=False))
    print("\nhistory:" if event.history else "\nhistory: none (no failed attempt, no replay)")
    if event.history:
        _table(
            ["AT", "WHAT", "ATTEMPT", "STATUS", "BY", "ERROR / DETAIL"],
            [
                [
                    _time(h.at),
                    h.kind,
                    str(h.attempt or ""),
                    str(h.status_code or ""),
                    h.actor,
                    _one_line(h.error or h.detail or "", 80),
                ]
                for h in event.history
            ],
        )
    return 0


async def cmd_replay(args: argparse.Namespace, db: Database) -> int:
    now = datetime.now(UTC)
    has_filter = any((args.status, args.name, args.since, args.until))
    if args.ids and has_filter:
        raise InvalidArgument("give event ids or a filter (--status …), not both")
    if not args.ids and not args.status:
        raise InvalidArgument("give event ids, or --status failed|delivered to replay by filter")
    selection = Selection(ids=tuple(args.ids)) if args.ids else Selection(where=_filter(args, now))
    actor = args.by or f"{getpass.getuser()}@{socket.gethostname()}"
    result = await operations.replay(
        db,
        selection,
        actor=actor,
        now=now,
        new_ids=args.new_id,
        dry_run=args.dry_run,
        progress=None if args.json else _progress("examined"),
    )
    if args.json:
        _print_json(result.as_json())
        return 0
    if args.dry_run:
        print(f"would replay {len(result.would_replay)} of {result.matched} matched events:")
        for event_id in result.would_replay:
            print(f"  {event_id}")
    else:
        print(f"replayed {len(result.replayed)} of {result.matched} matched events")
        for r in result.replayed:
            print(f"  {r.id} (was {r.was})" + (f" -> new id {r.new_id}" if r.new_id else ""))
    for event_id, reason in result.skipped.items():
        print(f"  skipped {event_id}: {reason}")
    return 0


async def cmd_purge(args: argparse.Namespace, db: Database) -> int:
    result = await operations.purge(
        db,
        now=datetime.now(UTC),
        delivered_older_than=(
            operations.parse_duration(args.delivered_older_than)
            if args.delivered_older_than
            else None
        ),
        failed_older_than=(
            operations.parse_duration(args.failed_older_than) if args.failed_older_than else None
        ),
        dry_run=args.dry_run,
        progress=None if args.json else _progress("deleted"),
    )
    if args.json:
        _print_json(result.as_json())
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{verb} {result.delivered:,} delivered and {result.failed:,} failed rows")
    return 0


# -- formatting -----------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> None:
    if not rows:
        print("(none)")
        return
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _origin(origin: str | None) -> str:
    """Where an event came from: a relay key's name, or POST /api."""
    return f"key {origin}" if origin is not None else "api"


def _time(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    parts = [f"{days}d" * bool(days), f"{hours}h" * bool(hours), f"{minutes}m" * bool(minutes)]
    return " ".join(p for p in [*parts, f"{secs}s"] if p)


def _one_line(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


__all__ = ["InvalidArgument", "add_commands"]
