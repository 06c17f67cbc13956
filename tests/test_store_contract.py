"""The store's contract: every verb of service.store.database.Database, run
against each backend as open_database(url) gives it (a SQLite file, a
PostgreSQL database), with what each verb promises read back from the tables.
A backend passes these tests or it is not done."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import pytest_asyncio
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from service import auth, outbox
from service.ids import new_event_id
from service.models import documents, relay_keys
from service.models import outbox as outbox_table
from service.store import open_database
from service.store.contract import (
    Accepted,
    Claim,
    ClaimedEvent,
    HandOff,
    IdempotencyKeyReused,
    NewEvent,
    Relayed,
    RelayRequest,
    Submission,
)
from service.store.database import Database, RowsRefused, Written
from service.store.encoding import RawJSON

T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
LEASE = HandOff(owner="w-here", token="0f1e2d3c-0000-4000-8000-000000000001", expires_at=T0)


@pytest_asyncio.fixture
async def store(db_url: str) -> AsyncIterator[Database]:
    """The store as the service opens it (on SQLite, with its rows process),
    on a migrated database (see conftest's db_url)."""
    database = open_database(db_url, rows_process=True)
    async with database:
        yield database


@pytest_asyncio.fixture
async def alice(store: Database) -> auth.User:
    return await auth.create_user(store, "alice", "a long enough password")


# -- helpers ------------------------------------------------------------------------


def new_event(event_id: str | None = None, *, at: datetime = T0, data: str = "{}") -> NewEvent:
    event_id = event_id or new_event_id()
    payload = f'{{"id":"{event_id}","name":"test/ü","data":{data}}}'
    return NewEvent(event_id, "test/ü", RawJSON(payload), at)


@dataclass
class Pending:
    """What the intake hands a store: a request, and the future that answers it."""

    submission: Any
    future: asyncio.Future[Any]


def pending(request: Any) -> Pending:
    return Pending(request, asyncio.get_running_loop().create_future())


async def written_by(
    verb: Callable[[Sequence[Pending], HandOff | None, Any], None],
    batch: Sequence[Pending],
    hand_off: HandOff | None = None,
) -> Written:
    """Run an inserting verb; what it gives ``done``, or the error it gives."""
    answered: asyncio.Future[Written] = asyncio.get_running_loop().create_future()

    def done(result: Any, error: BaseException | None) -> None:
        if error is not None:
            answered.set_exception(error)
        else:
            answered.set_result(result)

    verb(batch, hand_off, done)
    return await answered


def submission(user_id: int, name: str, key: str | None = None, body: str = "a") -> Submission:
    request_hash = None if key is None else body * 64
    return Submission(user_id, name, new_event(), key, request_hash)


async def enqueue(store: Database, *events: NewEvent, hand_off: HandOff | None = None) -> None:
    await store.write(lambda conn: store.enqueue(conn, events, hand_off))


async def rows(store: Database) -> dict[str, Any]:
    """Every outbox row by id, its payload as the stored text."""
    async with store.engine.connect() as conn:
        found = await conn.execute(
            sa.select(outbox_table, sa.cast(outbox_table.c.payload, sa.Text).label("text"))
        )
    return {row.id: row for row in found}


async def document_rows(store: Database) -> list[Any]:
    async with store.engine.connect() as conn:
        return list(await conn.execute(sa.select(documents).order_by(documents.c.id)))


def lease_of(row: Any) -> tuple[str, str | None, str | None, datetime | None]:
    return row.status, row.lease_owner, row.lease_token, row.lease_expires_at


def assert_new_row(row: Any, event: NewEvent, *, origin: str | None = None) -> None:
    """A row as a new event enters the outbox: its event, nothing sent yet."""
    assert (row.id, row.event_name, row.text, row.origin) == (
        event.id,
        event.name,
        event.payload,
        origin,
    )
    assert (row.attempts, row.created_at, row.available_at) == (
        0,
        event.created_at,
        event.created_at,
    )
    assert (row.delivered_at, row.last_error, row.last_status_code, row.origin_id) == (None,) * 4


async def claim(store: Database, *, owner: str = "w", limit: int = 10, now: datetime = T0) -> Claim:
    return await store.claim(
        token=str(uuid.uuid4()),
        owner=owner,
        limit=limit,
        now=now,
        expires_at=now + timedelta(seconds=30),
    )


def test_a_backend_must_implement_every_verb_without_a_default() -> None:
    assert Database.__abstractmethods__ == {
        "insert_submissions",
        "insert_relayed",
        "enqueue",
        "serialize",
        "claim",
        "minute_of",
    }

    class Partial(Database):
        pass

    with pytest.raises(TypeError, match="abstract"):
        Partial("sqlite+aiosqlite://")  # type: ignore[abstract]


# -- insert_submissions -----------------------------------------------------------


async def test_insert_submissions_writes_each_document_with_its_pending_event(
    store: Database, alice: auth.User
) -> None:
    subs = [submission(alice.id, f"reports/q{i} ünïcode ✓.pdf") for i in range(3)]
    results, fresh = await written_by(store.insert_submissions, [pending(s) for s in subs])
    assert results == [Accepted(s.event.id) for s in subs]
    assert fresh == [s.event for s in subs]
    docs = await document_rows(store)
    assert [
        (d.user_id, d.document_name, d.event_id, d.idempotency_key, d.request_hash, d.created_at)
        for d in docs
    ] == [(alice.id, s.document_name, s.event.id, None, None, T0) for s in subs]
    found = await rows(store)
    assert set(found) == {s.event.id for s in subs}
    for s in subs:
        assert_new_row(found[s.event.id], s.event)
        assert lease_of(found[s.event.id]) == ("pending", None, None, None)


async def test_insert_submissions_under_a_hand_off_writes_the_rows_leased(
    store: Database, alice: auth.User
) -> None:
    subs = [submission(alice.id, "a"), submission(alice.id, "b", key="k")]
    for sub in subs:  # a plain batch, and a keyed one
        await written_by(store.insert_submissions, [pending(sub)], LEASE)
    found = await rows(store)
    for sub in subs:
        assert_new_row(found[sub.event.id], sub.event)
        assert lease_of(found[sub.event.id]) == ("sending", LEASE.owner, LEASE.token, T0)


async def test_a_reused_idempotency_key_answers_for_its_first_request(
    store: Database, alice: auth.User
) -> None:
    first = submission(alice.id, "first", key="k1")
    await written_by(store.insert_submissions, [pending(first)])
    same = submission(alice.id, "same body again", key="k1")
    other_body = submission(alice.id, "another body", key="k1", body="b")
    new_key = submission(alice.id, "new", key="k2")
    new_key_again = submission(alice.id, "new, twice in one batch", key="k2")
    batch = [pending(s) for s in (same, other_body, new_key, new_key_again)]
    results, fresh = await written_by(store.insert_submissions, batch)
    assert results[0] == Accepted(first.event.id, replayed=True)
    assert isinstance(results[1], IdempotencyKeyReused)
    assert results[2:] == [Accepted(new_key.event.id), Accepted(new_key.event.id, replayed=True)]
    assert fresh == [new_key.event]
    docs = await document_rows(store)
    assert [(d.document_name, d.event_id, d.idempotency_key) for d in docs] == [
        ("first", first.event.id, "k1"),
        ("new", new_key.event.id, "k2"),
    ]
    assert set(await rows(store)) == {first.event.id, new_key.event.id}


@pytest.mark.parametrize("key", [None, "k"], ids=["plain", "keyed"])
async def test_a_request_cancelled_before_its_transaction_is_left_out(
    store: Database, alice: auth.User, key: str | None
) -> None:
    subs = [submission(alice.id, n, key=key and f"{key}-{n}") for n in ("a", "gone", "c")]
    batch = [pending(s) for s in subs]
    batch[1].future.cancel()
    results, fresh = await written_by(store.insert_submissions, batch)
    assert results == [Accepted(subs[0].event.id), None, Accepted(subs[2].event.id)]
    assert fresh == [subs[0].event, subs[2].event]
    assert [d.document_name for d in await document_rows(store)] == ["a", "c"]
    assert set(await rows(store)) == {subs[0].event.id, subs[2].event.id}


@pytest.mark.parametrize("key", [None, "k"], ids=["plain", "keyed"])
async def test_a_refused_row_refuses_the_whole_batch_as_rows_refused(
    store: Database, alice: auth.User, key: str | None
) -> None:
    # The second names a user that does not exist: a foreign key violation.
    subs = [submission(alice.id, "ok", key=key), submission(alice.id + 99, "ghost", key=key)]
    with pytest.raises(RowsRefused):
        await written_by(store.insert_submissions, [pending(s) for s in subs])
    assert await document_rows(store) == []
    assert await rows(store) == {}


# -- insert_relayed ---------------------------------------------------------------


async def add_relay_keys(store: Database, *names: str) -> None:
    await store.write(
        lambda conn: conn.execute(
            relay_keys.insert(),
            [{"name": n, "key_hash": n.ljust(64, "0"), "created_at": T0} for n in names],
        )
    )


async def last_used(store: Database) -> dict[str, datetime | None]:
    async with store.engine.connect() as conn:
        found = await conn.execute(sa.select(relay_keys.c.name, relay_keys.c.last_used_at))
    return dict(found.all())


def relay_request(origin: str, events: int, seconds: int) -> RelayRequest:
    """As the relay makes one: its events created at its receipt."""
    at = T0 + timedelta(seconds=seconds)
    return RelayRequest(origin, [new_event(at=at) for _ in range(events)], at)


async def test_insert_relayed_writes_each_event_with_its_origin(store: Database) -> None:
    await add_relay_keys(store, "app-a", "app-b")
    a, b = relay_request("app-a", 2, 1), relay_request("app-b", 1, 2)
    results, fresh = await written_by(store.insert_relayed, [pending(a), pending(b)])
    assert results == [Relayed(2), Relayed(1)]
    assert fresh == [*a.events, *b.events]
    found = await rows(store)
    assert len(found) == 3
    for request in (a, b):
        for event in request.events:
            assert_new_row(found[event.id], event, origin=request.origin)
            assert lease_of(found[event.id]) == ("pending", None, None, None)


async def test_each_key_is_marked_used_at_its_latest_request_never_earlier(
    store: Database,
) -> None:
    await add_relay_keys(store, "app-a", "app-b", "idle")
    batch = [
        relay_request("app-a", 1, 1),
        relay_request("app-b", 1, 2),
        relay_request("app-a", 2, 3),
    ]
    await written_by(store.insert_relayed, [pending(r) for r in batch])
    at = {"app-a": T0 + timedelta(seconds=3), "app-b": T0 + timedelta(seconds=2), "idle": None}
    assert await last_used(store) == at
    # A batch that commits after a later one does not move it back.
    await written_by(store.insert_relayed, [pending(relay_request("app-a", 1, 0))])
    assert await last_used(store) == at


async def test_relayed_events_under_a_hand_off_are_written_leased(store: Database) -> None:
    await add_relay_keys(store, "app")
    request = RelayRequest("app", [new_event()], T0)
    await written_by(store.insert_relayed, [pending(request)], LEASE)
    [row] = (await rows(store)).values()
    assert lease_of(row) == ("sending", LEASE.owner, LEASE.token, T0)


async def test_an_id_already_in_the_outbox_is_not_stored_twice(store: Database) -> None:
    await add_relay_keys(store, "app", "other")
    kept = new_event("client-id-1", data='{"first":true}')
    await written_by(store.insert_relayed, [pending(RelayRequest("app", [kept], T0))])
    again = new_event("client-id-1", data='{"first":false}')
    fresh_one = new_event("client-id-2")
    request = RelayRequest("other", [again, fresh_one], T0 + timedelta(seconds=1))
    results, fresh = await written_by(store.insert_relayed, [pending(request)])
    assert (results, fresh) == ([Relayed(1)], [fresh_one])
    found = await rows(store)
    assert_new_row(found["client-id-1"], kept, origin="app")  # as first written
    assert_new_row(found["client-id-2"], fresh_one, origin="other")


async def test_an_id_met_twice_in_one_batch_is_stored_once_for_the_first_request(
    store: Database,
) -> None:
    await add_relay_keys(store, "a", "b")
    first = new_event("twice", data='{"n":1}')
    same_request = new_event("twice", data='{"n":2}')
    other_request = new_event("twice", data='{"n":3}')
    batch = [
        pending(RelayRequest("a", [first, same_request], T0)),
        pending(RelayRequest("b", [other_request], T0)),
    ]
    results, fresh = await written_by(store.insert_relayed, batch)
    assert (results, fresh) == ([Relayed(1), Relayed(0)], [first])
    found = await rows(store)
    assert list(found) == ["twice"]
    assert_new_row(found["twice"], first, origin="a")


async def test_a_relay_request_cancelled_before_its_transaction_is_left_out(
    store: Database,
) -> None:
    await add_relay_keys(store, "kept", "gone")
    kept = RelayRequest("kept", [new_event()], T0)
    gone = RelayRequest("gone", [new_event()], T0 + timedelta(seconds=9))
    batch = [pending(kept), pending(gone)]
    batch[1].future.cancel()
    results, fresh = await written_by(store.insert_relayed, batch)
    assert (results, fresh) == ([Relayed(1), None], kept.events)
    assert set(await rows(store)) == {kept.events[0].id}
    assert await last_used(store) == {"kept": T0, "gone": None}


async def test_a_refused_relayed_row_refuses_the_whole_batch_as_rows_refused(
    store: Database,
) -> None:
    await add_relay_keys(store, "app")
    nameless = new_event()
    nameless.name = None  # type: ignore[assignment]  # NOT NULL
    batch = [
        pending(RelayRequest("app", [new_event()], T0)),
        pending(RelayRequest("app", [nameless], T0)),
    ]
    with pytest.raises(RowsRefused):
        await written_by(store.insert_relayed, batch)
    assert await rows(store) == {}
    assert await last_used(store) == {"app": None}


# -- enqueue and write ------------------------------------------------------------


async def test_enqueue_writes_pending_rows_in_the_callers_transaction(store: Database) -> None:
    events = [new_event(at=T0 + timedelta(seconds=i)) for i in range(3)]
    await enqueue(store, *events)
    await enqueue(store)  # nothing to write: no error, no row
    found = await rows(store)
    assert set(found) == {e.id for e in events}
    for event in events:
        assert_new_row(found[event.id], event)
        assert lease_of(found[event.id]) == ("pending", None, None, None)


async def test_enqueue_under_a_hand_off_writes_leased_rows(store: Database) -> None:
    event = new_event()
    await enqueue(store, event, hand_off=LEASE)
    row = (await rows(store))[event.id]
    assert_new_row(row, event)
    assert lease_of(row) == ("sending", LEASE.owner, LEASE.token, T0)


async def test_a_write_that_fails_keeps_nothing_and_raises_its_error(store: Database) -> None:
    class Broken(Exception):
        pass

    def job(conn: Connection) -> None:
        store.enqueue(conn, [new_event()])
        raise Broken()

    with pytest.raises(Broken):
        await store.write(job)
    assert await rows(store) == {}
    assert await store.write(lambda conn: conn.execute(sa.text("SELECT 42")).scalar_one()) == 42


async def test_submit_answers_done_once_its_transaction_has_ended(store: Database) -> None:
    answers: asyncio.Queue[tuple[Any, BaseException | None]] = asyncio.Queue()
    event = new_event()

    def job(conn: Connection) -> str:
        store.enqueue(conn, [event])
        return "committed"

    def fails(conn: Connection) -> None:
        store.enqueue(conn, [new_event()])
        raise ValueError("no")

    store.submit(job, lambda result, error: answers.put_nowait((result, error)))
    assert await answers.get() == ("committed", None)
    assert set(await rows(store)) == {event.id}
    store.submit(fails, lambda result, error: answers.put_nowait((result, error)))
    result, error = await answers.get()
    assert result is None and isinstance(error, ValueError)
    assert set(await rows(store)) == {event.id}


# -- claim --------------------------------------------------------------------------


async def test_claim_leases_due_rows_oldest_first(store: Database) -> None:
    events = [new_event(at=T0 - timedelta(seconds=s)) for s in (1, 3, 2)]
    await enqueue(store, *events)
    got = await store.claim(
        token="t-1", owner="w1", limit=10, now=T0, expires_at=T0 + timedelta(seconds=30)
    )
    assert (got.token, got.owner) == ("t-1", "w1")
    oldest_first = [events[1], events[2], events[0]]
    assert got.events == [ClaimedEvent(e.id, e.payload, 0, False) for e in oldest_first]
    for row in (await rows(store)).values():
        assert lease_of(row) == ("sending", "w1", "t-1", T0 + timedelta(seconds=30))
        assert row.attempts == 0
    assert (await claim(store, owner="w2")).events == []  # leased: nobody else's


async def test_claim_takes_no_more_than_its_limit_the_oldest(store: Database) -> None:
    events = [new_event(at=T0 - timedelta(seconds=s)) for s in range(5)]
    await enqueue(store, *events)
    got = await claim(store, limit=2)
    assert [e.id for e in got.events] == [events[4].id, events[3].id]
    statuses = {i: r.status for i, r in (await rows(store)).items()}
    assert sorted(statuses.values()) == ["pending"] * 3 + ["sending"] * 2


async def test_a_row_not_due_is_not_claimed(store: Database) -> None:
    await enqueue(store, new_event(at=T0 + timedelta(microseconds=1)))
    leased = new_event()
    await enqueue(store, leased, hand_off=LEASE)  # its lease ends at T0
    assert (await claim(store, now=T0 - timedelta(microseconds=1))).events == []
    assert [e.id for e in (await claim(store, now=T0)).events] == [leased.id]


async def test_an_expired_lease_is_claimed_again_before_due_rows(store: Database) -> None:
    expired = new_event(at=T0 - timedelta(seconds=60))
    await enqueue(store, expired, hand_off=LEASE)  # leased until T0
    due = new_event(at=T0 - timedelta(seconds=120))  # older, but a pending row
    await enqueue(store, due)
    later = T0 + timedelta(seconds=1)
    first = await claim(store, owner="alive", limit=1, now=later)
    assert first.events == [ClaimedEvent(expired.id, expired.payload, 0, False)]
    row = (await rows(store))[expired.id]
    assert lease_of(row) == ("sending", "alive", first.token, later + timedelta(seconds=30))
    assert [e.id for e in (await claim(store, owner="next", now=later)).events] == [due.id]


async def test_a_claimed_row_with_a_story_is_marked_seen_with_its_attempts(
    store: Database,
) -> None:
    retried, fresh = (
        new_event(at=T0 - timedelta(seconds=2)),
        new_event(at=T0 - timedelta(seconds=1)),
    )
    await enqueue(store, retried, fresh)
    await store.write(
        lambda conn: conn.execute(
            outbox_table.update()
            .where(outbox_table.c.id == retried.id)
            .values(attempts=2, last_error="timed out")
        )
    )
    got = await claim(store)
    assert got.events == [
        ClaimedEvent(retried.id, retried.payload, 2, True),
        ClaimedEvent(fresh.id, fresh.payload, 0, False),
    ]


async def test_concurrent_claims_never_share_a_row(store: Database) -> None:
    await enqueue(store, *(new_event(at=T0 - timedelta(microseconds=i)) for i in range(200)))
    claims = await asyncio.gather(*(claim(store, owner=f"w{i}", limit=30) for i in range(8)))
    ids = [e.id for c in claims for e in c.events]
    assert len(ids) == len(set(ids)) == 200  # 8 x 30 places for 200 rows
    found = await rows(store)
    for c in claims:
        for event in c.events:
            assert (found[event.id].lease_owner, found[event.id].lease_token) == (c.owner, c.token)


# -- marks under a lease ----------------------------------------------------------


async def test_mark_delivered_moves_the_rows_its_lease_holds(store: Database) -> None:
    events = [new_event(at=T0 - timedelta(seconds=s)) for s in (2, 1)]
    await enqueue(store, *events)
    got = await claim(store)
    at = T0 + timedelta(seconds=3)
    assert await outbox.mark_delivered(store, [e.id for e in events], got.token, now=at) == 2
    for row in (await rows(store)).values():
        assert lease_of(row) == ("delivered", None, None, None)
        assert (row.attempts, row.delivered_at, row.last_status_code) == (1, at, 200)


async def test_a_stale_lease_token_marks_nothing(store: Database) -> None:
    event = new_event()
    await enqueue(store, event)
    old = await claim(store, owner="a", now=T0)
    new = await claim(store, owner="b", now=T0 + timedelta(seconds=31))
    assert await outbox.mark_delivered(store, [event.id], old.token, now=T0) == 0
    assert await outbox.mark_failed(store, [event.id], old.token, error="x", status_code=400) == 0
    assert await outbox.release(store, [event.id], old.token) == 0
    row = (await rows(store))[event.id]
    assert lease_of(row) == ("sending", "b", new.token, T0 + timedelta(seconds=61))
    assert (row.attempts, row.delivered_at, row.last_error) == (0, None, None)


async def test_a_delivered_row_is_not_marked_again(store: Database) -> None:
    event = new_event()
    await enqueue(store, event)
    got = await claim(store)
    assert await outbox.mark_delivered(store, [event.id], got.token, now=T0) == 1
    assert await outbox.mark_delivered(store, [event.id], got.token, now=T0) == 0
    assert (await rows(store))[event.id].attempts == 1


# -- minute_of ------------------------------------------------------------------------


async def test_minute_of_groups_times_by_their_utc_minute(store: Database) -> None:
    plus_two = timezone(timedelta(hours=2))
    times = [
        datetime(2026, 3, 1, 10, 0, 0, tzinfo=UTC),
        datetime(2026, 3, 1, 10, 0, 59, 999999, tzinfo=UTC),
        datetime(2026, 3, 1, 12, 1, 0, tzinfo=plus_two),  # 10:01 UTC
        datetime(2026, 3, 1, 23, 59, 30, tzinfo=UTC),
    ]
    await enqueue(store, *(new_event(at=t) for t in times))
    minute = store.minute_of(outbox_table.c.created_at).label("minute")
    async with store.engine.connect() as conn:
        found = (
            await conn.execute(
                sa.select(minute, sa.func.count()).group_by("minute").order_by("minute")
            )
        ).all()
    assert found == [
        (datetime(2026, 3, 1, 10, 0, tzinfo=UTC), 2),
        (datetime(2026, 3, 1, 10, 1, tzinfo=UTC), 1),
        (datetime(2026, 3, 1, 23, 59, tzinfo=UTC), 1),
    ]


# -- serialize ------------------------------------------------------------------------


async def test_transactions_serialized_on_a_common_key_run_one_after_the_other(
    store: Database,
) -> None:
    def count_then_insert(conn: Connection) -> int:
        store.serialize(conn, ["b-key", "a-key"])
        seen = conn.scalar(sa.select(sa.func.count()).select_from(outbox_table))
        store.enqueue(conn, [new_event(f"seq-{seen}")])
        return seen

    seen = await asyncio.gather(*(store.write(count_then_insert) for _ in range(8)))
    assert sorted(seen) == list(range(8))  # each saw all the others before it


# -- notify and listen --------------------------------------------------------------


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_sqlite_has_no_listener_its_workers_poll(store: Database) -> None:
    assert store.listen(asyncio.Event()) is None
    await store.write(store.notify)  # nothing to wake: commits as any write
    await enqueue(store, new_event())
    assert len(await rows(store)) == 1


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_a_commit_that_notifies_wakes_the_listener(store: Database) -> None:
    wake = asyncio.Event()
    listening = asyncio.create_task(store.listen(wake))  # type: ignore[arg-type]
    try:
        async with asyncio.timeout(10):
            await wake.wait()  # given once listening: rows may have come meanwhile
        wake.clear()
        await store.write(store.notify)
        async with asyncio.timeout(10):
            await wake.wait()
    finally:
        listening.cancel()
        await asyncio.gather(listening, return_exceptions=True)


@pytest_asyncio.fixture
async def notifications(store: Database) -> AsyncIterator[Callable[[str], Any]]:
    """PostgreSQL: the notifications on the workers' channel, in commit order,
    up to and including a marker sent after them (a NOTIFY of its own)."""
    import asyncpg

    from service.store.postgres.listener import CHANNEL, asyncpg_dsn

    conn = await asyncpg.connect(asyncpg_dsn(store.url))
    heard: asyncio.Queue[str] = asyncio.Queue()
    await conn.add_listener(CHANNEL, lambda *args: heard.put_nowait(args[-1]))

    async def until_marker(marker: str) -> list[str]:
        await store.write(lambda c: c.execute(sa.select(sa.func.pg_notify(CHANNEL, marker))))
        got: list[str] = []
        async with asyncio.timeout(10):
            while not got or got[-1] != marker:
                got.append(await heard.get())
        return got

    try:
        yield until_marker
    finally:
        await conn.close()


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_new_rows_notify_at_commit_unless_handed_off(
    store: Database, alice: auth.User, notifications: Callable[[str], Any]
) -> None:
    await add_relay_keys(store, "app")
    await enqueue(store, new_event())
    assert await notifications("enqueued") == ["", "enqueued"]
    await enqueue(store, new_event(), hand_off=LEASE)
    assert await notifications("enqueued, handed off") == ["enqueued, handed off"]
    for verb, request in (
        (store.insert_submissions, lambda: submission(alice.id, "plain")),
        (store.insert_submissions, lambda: submission(alice.id, "keyed", key=new_event_id())),
        (store.insert_relayed, lambda: RelayRequest("app", [new_event()], T0)),
    ):
        await written_by(verb, [pending(request())])
        assert await notifications("written") == ["", "written"]
        await written_by(verb, [pending(request())], LEASE)
        assert await notifications("handed off") == ["handed off"]


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_a_notify_in_a_transaction_that_fails_wakes_nobody(
    store: Database, notifications: Callable[[str], Any]
) -> None:
    def notify_then_fail(conn: Connection) -> None:
        store.notify(conn)
        raise RuntimeError("rolled back")

    with pytest.raises(RuntimeError):
        await store.write(notify_then_fail)
    assert await notifications("after") == ["after"]
