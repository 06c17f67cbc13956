"""What operators do (operations.py, behind the CLI and the admin API), on both databases."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from service import auth, operations, outbox
from service.config import Settings
from service.models import documents, outbox_history
from service.models import outbox as outbox_table
from service.operations import Filter, InvalidArgument, Selection
from service.store.database import Database
from tests.fakes.inngest import POISON_ERROR, Fault, StandIn
from tests.test_delivery import enqueue, later, make_worker, states


async def history(engine: AsyncEngine, event_id: str) -> list[tuple[str, int | None, str]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            sa.select(outbox_history.c.kind, outbox_history.c.attempt, outbox_history.c.actor)
            .where(outbox_history.c.event_id == event_id)
            .order_by(outbox_history.c.id)
        )
        return [tuple(row) for row in rows]  # type: ignore[misc]


async def fail_for_good(
    db: Database,
    settings: Settings,
    http: aiohttp.ClientSession,
    inngest: StandIn,
    count: int = 1,
) -> list[str]:
    """Rows that Inngest refuses (a 400), so they are failed at once."""
    ids = await enqueue(db, count)
    inngest.poison_ids |= set(ids)
    await make_worker(db, settings, http).drain_once()
    inngest.poison_ids -= set(ids)
    return ids


# -- history ----------------------------------------------------------------------


async def test_a_first_try_delivery_writes_no_history(
    db: Database, engine: AsyncEngine, delivery_settings: Settings, http, inngest: StandIn
) -> None:
    [event_id] = await enqueue(db, 1)
    await make_worker(db, delivery_settings, http).drain_once()
    assert (await states(engine))[event_id].status == "delivered"
    assert await history(engine, event_id) == []


async def test_history_tells_the_story_of_retries_then_delivery(
    db: Database, engine: AsyncEngine, delivery_settings: Settings, http, inngest: StandIn
) -> None:
    [event_id] = await enqueue(db, 1)
    inngest.fail_next(Fault.ERROR_500)  # an attempt spent
    inngest.fail_next(Fault.ERROR_503)  # Inngest unavailable: held, nothing spent
    worker = make_worker(db, delivery_settings, http, owner="w-1")
    await worker.drain_once()
    worker = make_worker(db, delivery_settings, http, owner="w-2", clock=lambda: later(11))
    await worker.drain_once()
    worker = make_worker(db, delivery_settings, http, owner="w-3", clock=lambda: later(22))
    await worker.drain_once()
    assert await history(engine, event_id) == [
        ("retry", 1, "w-1"),
        ("held", None, "w-2"),
        ("delivered", 2, "w-3"),
    ]
    detail = await operations.get_event(db, event_id)
    assert detail is not None
    assert [(h.kind, h.status_code) for h in detail.history] == [
        ("retry", 500),
        ("held", 503),
        ("delivered", 200),
    ]
    assert detail.history[0].error is not None and "500" in detail.history[0].error
    assert detail.status == "delivered"
    assert detail.event["id"] == event_id


async def test_a_row_held_by_a_dropped_connection_has_its_delivery_in_the_history(
    db: Database, engine: AsyncEngine, delivery_settings: Settings, http, inngest: StandIn
) -> None:
    """A dropped connection leaves an error and no status code on the row: its
    later delivery still closes the story."""
    [event_id] = await enqueue(db, 1)
    inngest.fail_next(Fault.DROP)
    await make_worker(db, delivery_settings, http, owner="w-1").drain_once()
    worker = make_worker(db, delivery_settings, http, owner="w-2", clock=lambda: later(11))
    await worker.drain_once()
    assert await history(engine, event_id) == [("held", None, "w-1"), ("delivered", 1, "w-2")]


async def test_a_refused_event_fails_with_its_error_in_the_history(
    db: Database, engine: AsyncEngine, delivery_settings: Settings, http, inngest: StandIn
) -> None:
    [event_id] = await fail_for_good(db, delivery_settings, http, inngest)
    detail = await operations.get_event(db, event_id)
    assert detail is not None and detail.status == "failed"
    [entry] = detail.history
    assert (entry.kind, entry.attempt, entry.status_code) == ("failed", 1, 400)
    assert entry.error == detail.last_error
    assert POISON_ERROR in entry.error


async def test_history_is_bounded_per_event(
    db: Database, engine: AsyncEngine, delivery_settings: Settings, http, inngest: StandIn
) -> None:
    [event_id] = await fail_for_good(db, delivery_settings, http, inngest)
    inngest.poison_ids.add(event_id)
    for _ in range(outbox.HISTORY_LIMIT):  # replay, fail, replay, fail, …
        await operations.replay(db, Selection(ids=(event_id,)), actor="op", now=datetime.now(UTC))
        await make_worker(db, delivery_settings, http).drain_once()
    entries = await history(engine, event_id)
    assert len(entries) == outbox.HISTORY_LIMIT
    assert entries[-1][0] == "failed" and entries[-2][0] == "replayed"


async def test_a_late_answer_writes_no_history(
    db: Database, engine: AsyncEngine, delivery_settings: Settings
) -> None:
    [event_id] = await enqueue(db, 1)
    now = datetime.now(UTC)
    old = await outbox.claim_batch(db, owner="old", limit=1, lease_seconds=1, now=now)
    await outbox.claim_batch(
        db, owner="new", limit=1, lease_seconds=30, now=now + timedelta(seconds=2)
    )
    entry = outbox.HistoryEntry(outbox.HistoryKind.FAILED, "old", now, 400, "late")
    assert (
        await outbox.mark_failed(
            db,
            [event_id],
            old.token,
            error="late",
            status_code=400,
            history=({event_id: 1}, entry),
        )  # fmt: skip
        == 0
    )
    assert await history(engine, event_id) == []


async def test_history_is_written_only_for_rows_the_lease_holds(
    db: Database, engine: AsyncEngine
) -> None:
    held, lost = await enqueue(db, 2)
    now = datetime.now(UTC)
    mine = await outbox.claim_batch(db, owner="me", limit=2, lease_seconds=30, now=now)
    async with engine.begin() as conn:  # another worker's lease now
        await conn.execute(
            outbox_table.update().where(outbox_table.c.id == lost).values(lease_token="other")
        )
    entry = outbox.HistoryEntry(outbox.HistoryKind.HELD, "worker-1", now, 502, "bad gateway ü")
    released = await outbox.release(
        db, [held, lost], mine.token, history=({held: 3, lost: 3}, entry)
    )
    assert released == 1
    async with engine.connect() as conn:
        rows = (await conn.execute(sa.select(outbox_history))).all()
    assert [
        (h.event_id, h.at, h.kind, h.attempt, h.status_code, h.error, h.actor, h.detail)
        for h in rows
    ] == [(held, now, "held", 3, 502, "bad gateway ü", "worker-1", None)]


# -- replay -----------------------------------------------------------------------


async def test_replay_keeps_the_id_resets_attempts_and_records_who(
    db: Database, engine: AsyncEngine, delivery_settings: Settings, http, inngest: StandIn
) -> None:
    [event_id] = await fail_for_good(db, delivery_settings, http, inngest)
    now = datetime.now(UTC)
    result = await operations.replay(db, Selection(ids=(event_id,)), actor="ops@host", now=now)
    assert [(r.id, r.new_id, r.was) for r in result.replayed] == [(event_id, None, "failed")]
    row = (await states(engine))[event_id]
    assert (row.status, row.attempts, row.delivered_at) == ("pending", 0, None)
    assert row.last_error is not None  # still the event's last error
    assert (await history(engine, event_id))[-1] == ("replayed", None, "ops@host")

    await make_worker(db, delivery_settings, http).drain_once()
    assert (await states(engine))[event_id].status == "delivered"
    assert inngest.accepted_ids.count(event_id) == 1
    kinds = [kind for kind, _, _ in await history(engine, event_id)]
    assert kinds == ["failed", "replayed", "delivered"]


async def test_replay_with_new_ids_changes_the_event_id_and_keeps_the_clients(
    db: Database, engine: AsyncEngine, delivery_settings: Settings, http, inngest: StandIn
) -> None:
    [event_id] = await enqueue(db, 1)
    await make_worker(db, delivery_settings, http).drain_once()  # delivered
    result = await operations.replay(
        db, Selection(ids=(event_id,)), actor="op", now=datetime.now(UTC), new_ids=True
    )
    [moved] = result.replayed
    assert moved.id == event_id and moved.new_id not in (None, event_id)
    assert moved.was == "delivered"
    rows = await states(engine)
    assert event_id not in rows
    row = rows[moved.new_id]
    assert (row.status, row.origin_id) == ("pending", event_id)
    assert row.payload["id"] == moved.new_id

    await make_worker(db, delivery_settings, http).drain_once()
    assert inngest.accepted_ids == [event_id, moved.new_id]
    # Both ids find it; the history says where it came from.
    by_old = await operations.get_event(db, event_id)
    assert by_old is not None and by_old.id == moved.new_id and by_old.origin_id == event_id
    assert by_old.history[0].detail == f"was delivered; new id {moved.new_id}, old id {event_id}"


async def test_replay_skips_what_is_not_failed_or_delivered(
    db: Database, engine: AsyncEngine
) -> None:
    [pending] = await enqueue(db, 1)
    result = await operations.replay(
        db, Selection(ids=(pending, "no-such-id")), actor="op", now=datetime.now(UTC)
    )
    assert result.replayed == []
    assert result.skipped == {
        pending: "pending: already on its way",
        "no-such-id": "not found",
    }
    assert result.matched == 2


async def test_replay_by_filter_and_dry_run(
    db: Database, engine: AsyncEngine, delivery_settings: Settings, http, inngest: StandIn
) -> None:
    failed = await fail_for_good(db, delivery_settings, http, inngest, count=3)
    await enqueue(db, 2)  # pending: never matched by --status failed
    selection = Selection(where=Filter(status=outbox.OutboxStatus.FAILED))
    dry = await operations.replay(db, selection, actor="op", now=datetime.now(UTC), dry_run=True)
    assert sorted(dry.would_replay) == sorted(failed)
    assert dry.replayed == [] and dry.matched == 3
    assert {row.status for i, row in (await states(engine)).items() if i in failed} == {"failed"}

    seen: list[int] = []
    done = await operations.replay(
        db, selection, actor="op", now=datetime.now(UTC), progress=seen.append
    )
    assert sorted(r.id for r in done.replayed) == sorted(failed)
    assert seen == [3]
    assert {row.status for row in (await states(engine)).values()} == {"pending"}


def test_a_selection_is_ids_or_a_replayable_filter() -> None:
    with pytest.raises(InvalidArgument, match="not both"):
        Selection(ids=("a",), where=Filter(status=outbox.OutboxStatus.FAILED))
    with pytest.raises(InvalidArgument, match="not both"):
        Selection()
    with pytest.raises(InvalidArgument, match="failed or delivered"):
        Selection(where=Filter(status=outbox.OutboxStatus.PENDING))


# -- list, stats, purge ------------------------------------------------------------------


async def test_list_pages_through_every_row_once_newest_first(db: Database) -> None:
    ids = []
    for _ in range(7):  # separate commits: ids from several milliseconds
        ids += await enqueue(db, 17)
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = await operations.list_events(db, Filter(), limit=25, cursor=cursor)
        seen += [e.id for e in page.events]
        pages += 1
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
        if pages == 2:
            await enqueue(db, 5)  # rows added meanwhile land before the cursor
    assert pages == 5
    assert seen == sorted(ids, reverse=True)


async def test_list_filters(
    db: Database, engine: AsyncEngine, delivery_settings: Settings, http, inngest: StandIn
) -> None:
    failed = await fail_for_good(db, delivery_settings, http, inngest, count=2)
    pending = await enqueue(db, 3)
    page = await operations.list_events(db, Filter(status=outbox.OutboxStatus.FAILED))
    assert sorted(e.id for e in page.events) == sorted(failed)
    assert all(e.last_error and e.last_status_code == 400 for e in page.events)
    page = await operations.list_events(db, Filter(name="nope"))
    assert page.events == [] and page.next_cursor is None
    page = await operations.list_events(db, Filter(name="test/document.requested"), limit=2)
    assert len(page.events) == 2 and page.next_cursor == page.events[-1].id
    future = datetime.now(UTC) + timedelta(hours=1)
    assert (await operations.list_events(db, Filter(since=future))).events == []
    assert len((await operations.list_events(db, Filter(until=future))).events) == 5
    page = await operations.list_events(db, Filter(status=outbox.OutboxStatus.PENDING))
    assert len(page.events) == 3
    assert set(pending) <= {e.id for e in (await operations.list_events(db, Filter())).events}
    with pytest.raises(InvalidArgument, match="limit must be between 1 and 500"):
        await operations.list_events(db, Filter(), limit=501)


async def test_stats_and_timeline(
    db: Database, engine: AsyncEngine, delivery_settings: Settings, http, inngest: StandIn
) -> None:
    await fail_for_good(db, delivery_settings, http, inngest, count=2)
    await enqueue(db, 4)
    await make_worker(db, delivery_settings, http).drain_once()  # delivers the 4
    await enqueue(db, 3)  # the backlog
    async with engine.begin() as conn:  # the oldest waiting row is 90 s old
        oldest = datetime.now(UTC) - timedelta(seconds=90)
        await conn.execute(
            sa.update(outbox_table)
            .where(outbox_table.c.status == "pending")
            .values(created_at=oldest)
        )
    now = datetime.now(UTC)
    stats = await operations.stats(db, now=now)
    assert stats.counts == {"pending": 3, "sending": 0, "delivered": 4, "failed": 2}
    assert stats.backlog == 3
    assert stats.oldest_pending_age_seconds == pytest.approx(90, abs=5)
    assert stats.failures_last_hour == 2
    assert stats.deliveries_per_minute == pytest.approx(4 / operations.RATE_WINDOW_MINUTES)

    minutes = await operations.timeline(db, now=now, backlog_now=stats.backlog)
    assert len(minutes) == operations.TIMELINE_MINUTES
    assert minutes[-1].start == now.replace(second=0, microsecond=0)
    assert sum(m.delivered for m in minutes) == 4
    assert sum(m.failed for m in minutes) == 2
    assert minutes[-1].backlog == 3
    assert minutes[0].backlog == 0  # an hour ago, nothing was waiting


async def test_purge_deletes_only_what_it_is_told(
    db: Database, engine: AsyncEngine, delivery_settings: Settings, http, inngest: StandIn
) -> None:
    failed = await fail_for_good(db, delivery_settings, http, inngest, count=2)
    await enqueue(db, 3)  # delivered below
    await make_worker(db, delivery_settings, http).drain_once()
    pending = await enqueue(db, 2)
    now = datetime.now(UTC)
    later_now = now + timedelta(days=8)
    dry = await operations.purge(
        db, now=later_now, delivered_older_than=timedelta(days=7), dry_run=True
    )
    assert (dry.delivered, dry.failed) == (3, 0)
    assert len(await states(engine)) == 7
    done = await operations.purge(db, now=later_now, delivered_older_than=timedelta(days=7))
    assert (done.delivered, done.failed) == (3, 0)
    assert set(await states(engine)) == set(failed + pending)
    assert await operations.purge(db, now=now, failed_older_than=timedelta(days=1)) == (
        operations.PurgeResult(0, 0, False)
    )
    done = await operations.purge(db, now=later_now, failed_older_than=timedelta(days=1))
    assert (done.delivered, done.failed) == (0, 2)
    assert set(await states(engine)) == set(pending)  # never pending, sending or failed unasked
    async with engine.connect() as conn:  # the history went with the rows
        assert await conn.scalar(sa.select(sa.func.count()).select_from(outbox_history)) == 0
    with pytest.raises(InvalidArgument, match="needs --delivered-older-than"):
        await operations.purge(db, now=now)


# -- the client's view ------------------------------------------------------------


async def alices_document(db: Database) -> tuple[auth.User, str, datetime]:
    """A user with one document request: (user, its event id, when it was made)."""
    alice = await auth.create_user(db, "alice", "a long password")
    [event_id] = await enqueue(db, 1)
    now = datetime.now(UTC)
    await add_document(db, alice.id, event_id, now)
    return alice, event_id, now


async def add_document(db: Database, user_id: int, event_id: str, now: datetime) -> None:
    """The business row of an event, as POST /api writes it with the event."""
    statement = documents.insert().values(
        user_id=user_id, document_name="a.pdf", event_id=event_id, created_at=now
    )
    await db.write(lambda conn: conn.execute(statement))


async def test_event_for_user(
    db: Database, engine: AsyncEngine, delivery_settings: Settings, http, inngest: StandIn
) -> None:
    alice, event_id, now = await alices_document(db)
    view = await operations.event_for_user(db, event_id, alice.id)
    assert view == {
        "id": event_id,
        "documentName": "a.pdf",
        "createdAt": now.isoformat(),
        "status": "pending",
    }
    assert await operations.event_for_user(db, event_id, alice.id + 1) is None
    assert await operations.event_for_user(db, "0" * 36, alice.id) is None


# -- arguments --------------------------------------------------------------------


def test_durations_and_times() -> None:
    assert operations.parse_duration("7d") == timedelta(days=7)
    assert operations.parse_duration("1d12h") == timedelta(hours=36)
    assert operations.parse_duration("90s") == timedelta(seconds=90)
    now = datetime(2026, 11, 23, 12, tzinfo=UTC)
    assert operations.parse_time("2h", now=now) == datetime(2026, 11, 23, 10, tzinfo=UTC)
    assert operations.parse_time("2026-11-23T10:00:00Z", now=now) == datetime(
        2026, 11, 23, 10, tzinfo=UTC
    )
    assert operations.parse_time("2026-11-23T11:00:00+01:00", now=now) == datetime(
        2026, 11, 23, 10, tzinfo=UTC
    )
    for bad in ("7", "d", "7 days", "-1d", ""):
        with pytest.raises(InvalidArgument, match="is not a duration"):
            operations.parse_duration(bad)
    with pytest.raises(InvalidArgument, match="is not a time"):
        operations.parse_time("yesterday", now=now)
    with pytest.raises(InvalidArgument, match="'sent' is not a status"):
        operations.parse_status("sent")


async def test_a_filtered_replay_ends_even_when_rows_come_back_to_the_filter(
    db: Database,
    engine: AsyncEngine,
    delivery_settings: Settings,
    http,
    inngest: StandIn,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With --new-id each replayed row gets a newer id; if a worker fails it again
    before the walk ends, the walk must not take it again (and again, forever)."""
    failed = await fail_for_good(db, delivery_settings, http, inngest, count=4)
    monkeypatch.setattr(operations, "REPLAY_BATCH", 2)
    real_replay = outbox.replay

    def replay_then_fail_again(db, conn, ids, **kwargs):  # type: ignore[no-untyped-def]
        moved, skipped = real_replay(db, conn, ids, **kwargs)
        conn.execute(
            sa.update(outbox_table)
            .where(outbox_table.c.id.in_([r.new_id for r in moved]))
            .values(status="failed")
        )
        return moved, skipped

    monkeypatch.setattr(outbox, "replay", replay_then_fail_again)
    selection = Selection(where=Filter(status=outbox.OutboxStatus.FAILED))
    async with asyncio.timeout(10):
        result = await operations.replay(
            db, selection, actor="op", now=datetime.now(UTC), new_ids=True
        )
    assert sorted(r.id for r in result.replayed) == sorted(failed)
    assert result.matched == 4


async def test_the_client_view_follows_a_new_id_and_tells_a_purge(
    db: Database, engine: AsyncEngine, delivery_settings: Settings, http, inngest: StandIn
) -> None:
    alice, event_id, now = await alices_document(db)
    await make_worker(db, delivery_settings, http).drain_once()
    result = await operations.replay(
        db, Selection(ids=(event_id,)), actor="op", now=now, new_ids=True
    )
    new_id = result.replayed[0].new_id
    assert new_id is not None
    by_old = await operations.event_for_user(db, event_id, alice.id)
    assert by_old is not None and (by_old["status"], by_old["replayedAs"]) == ("pending", new_id)
    by_new = await operations.event_for_user(db, new_id, alice.id)
    assert by_new is not None and by_new["status"] == "pending" and "replayedAs" not in by_new
    assert await operations.event_for_user(db, new_id, alice.id + 1) is None
    await make_worker(db, delivery_settings, http).drain_once()
    await operations.purge(db, now=now + timedelta(days=1), delivered_older_than=timedelta(0))
    gone = await operations.event_for_user(db, event_id, alice.id)
    assert gone is not None and gone["status"] == "purged"


def test_durations_too_long_are_invalid_not_a_crash() -> None:
    with pytest.raises(InvalidArgument, match="'300000w' is too long ago"):
        operations.parse_time("300000w", now=datetime.now(UTC))
    with pytest.raises(InvalidArgument, match="is too long a duration"):
        operations.parse_duration("9" * 400 + "d")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # PostgreSQL plans by statistics
async def test_lists_of_small_states_read_their_partial_index(db: Database) -> None:
    """Not a walk of the primary key past every delivered row (SQLite's choice
    for ORDER BY id otherwise)."""
    from service.operations import _SMALL_STATES, _SUMMARY_COLUMNS

    for status in _SMALL_STATES:
        query = (
            sa.select(*_SUMMARY_COLUMNS)
            .where(outbox_table.c.status == status)
            .order_by(sa.func.coalesce(outbox_table.c.id, "").desc())
            .limit(51)
        )
        async with db.engine.connect() as conn:
            compiled = query.compile(conn.sync_engine, compile_kwargs={"literal_binds": True})
            plan = " ".join(
                str(row[-1]) for row in await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}")
            )
        assert "USING INDEX ix_outbox_" in plan, plan
        assert "sqlite_autoindex_outbox" not in plan, plan
