"""Group commit: whole submissions per transaction, whatever is cancelled."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
import pytest_asyncio
import sqlalchemy as sa
from aiohttp.test_utils import TestClient
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.util import await_only

from service import auth, outbox
from service.app import create_app
from service.config import Settings
from service.ids import new_event_id
from service.intake import (
    Accepted,
    DocumentIntake,
    IntakeClosed,
    Overloaded,
    StorageUnavailable,
    Submission,
)
from service.keys import DATABASE, INTAKE
from service.models import documents
from service.models import outbox as outbox_table
from service.store.database import Database
from service.store.encoding import RawJSON
from tests.conftest import PASSWORD
from tests.support.wait import until


class Gate:
    """Holds the database's writer thread inside a transaction until released."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.entered = asyncio.Event()
        self.release = threading.Event()

    def __call__(self) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # SQLite: on the database's writer thread
            self._loop.call_soon_threadsafe(self.entered.set)
            self.release.wait(timeout=30)
        else:  # PostgreSQL: in SQLAlchemy's greenlet on the event loop
            await_only(self._wait())

    async def _wait(self) -> None:
        self.entered.set()
        await asyncio.to_thread(self.release.wait, 30)


def submission(user: auth.User, name: str = "doc") -> Submission:
    event_id = new_event_id()
    return Submission(
        user_id=user.id,
        document_name=name,
        event=outbox.NewEvent(
            id=event_id,
            name="test/event",
            payload=RawJSON(f'{{"id":"{event_id}","name":"test/event","data":{{}}}}'),
            created_at=datetime.now(UTC),
        ),
    )


async def hold_a_transaction(
    db: Database, intake: DocumentIntake, user: auth.User
) -> tuple[Gate, asyncio.Task[Accepted]]:
    """A first request whose transaction the store holds open, before COMMIT,
    until ``gate.release`` is set."""
    gate = Gate()
    db.before_commit = gate
    blocker = asyncio.create_task(intake.submit(submission(user, "blocker")))
    await gate.entered.wait()
    db.before_commit = None
    return gate, blocker


def batches_given(db: Database, monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Each batch the intake gives the database from now on, as it gives it."""
    given: list[object] = []
    insert = db.insert_submissions

    def record(batch: Any, hand_off: Any, done: Any) -> None:
        given.append(batch)
        insert(batch, hand_off, done)

    monkeypatch.setattr(db, "insert_submissions", record)
    return given


async def counts(engine: AsyncEngine) -> tuple[int, int]:
    async with engine.connect() as conn:
        docs = await conn.scalar(sa.select(sa.func.count()).select_from(documents))
        events = await conn.scalar(sa.select(sa.func.count()).select_from(outbox_table))
    return docs, events


@pytest_asyncio.fixture
async def intake(db: Database) -> AsyncIterator[DocumentIntake]:
    intake = DocumentIntake(db, queue_limit=100, batch_limit=50)
    await intake.start()
    yield intake
    await intake.close()


async def test_concurrent_submissions_share_commits(
    db: Database, engine: AsyncEngine, user: auth.User
) -> None:
    intake = DocumentIntake(db, batch_limit=50)
    await intake.start()
    subs = [submission(user, f"d{i}") for i in range(100)]
    results = await asyncio.gather(*(intake.submit(s) for s in subs))
    await intake.close()
    assert results == [Accepted(s.event.id) for s in subs]
    assert await counts(engine) == (100, 100)
    # 100 submissions, batches of at most 50: two commits, not a hundred.
    assert intake.commits == 2


async def test_requests_wait_while_the_store_holds_all_the_batches_it_takes_then_go_as_one(
    db: Database, engine: AsyncEngine, user: auth.User, monkeypatch: pytest.MonkeyPatch
) -> None:
    intake = DocumentIntake(db, batch_limit=50)
    await intake.start()
    gate, blocker = await hold_a_transaction(db, intake, user)
    given = batches_given(db, monkeypatch)
    subs = [submission(user, f"d{i}") for i in range(6)]
    tasks = []
    for queued, sub in enumerate(subs, start=2):
        tasks.append(asyncio.create_task(intake.submit(sub)))
        # Queued: its flush runs before the next request arrives, so each
        # would be a batch of its own if the store took it.
        await until(lambda queued=queued: intake.queued == queued)
    await asyncio.sleep(0)  # the last one's flush
    taken = db.batches_in_flight - 1  # besides the blocker's
    assert [len(batch) for batch in given] == [1] * taken
    gate.release.set()
    await blocker
    results = await asyncio.gather(*tasks)
    await intake.close()
    assert results == [Accepted(s.event.id) for s in subs]
    # The rest waited, then went to the store together.
    assert [len(batch) for batch in given] == [1] * taken + [len(subs) - taken]
    assert await counts(engine) == (7, 7)


async def test_each_answer_waits_for_its_commit(
    db: Database, intake: DocumentIntake, engine: AsyncEngine, user: auth.User
) -> None:
    gate = Gate()
    db.before_commit = gate
    task = asyncio.create_task(intake.submit(submission(user)))
    await gate.entered.wait()
    # Not a wait for something: one more turn of the loop, in which an answer
    # given before COMMIT would complete the task.
    await asyncio.sleep(0)
    assert not task.done()  # both rows written, COMMIT not yet run: no answer
    assert await counts(engine) == (0, 0)  # and another connection sees nothing
    gate.release.set()
    await task
    assert await counts(engine) == (1, 1)


async def test_cancelled_while_queued_writes_nothing(
    db: Database, intake: DocumentIntake, engine: AsyncEngine, user: auth.User
) -> None:
    gate = Gate()
    db.before_commit = gate
    first = asyncio.create_task(intake.submit(submission(user, "first")))
    await gate.entered.wait()
    queued = asyncio.create_task(intake.submit(submission(user, "queued")))
    await until(lambda: intake.queued == 2)  # "first" in its transaction, "queued" waiting
    queued.cancel()
    gate.release.set()
    await first
    with pytest.raises(asyncio.CancelledError):
        await queued
    await intake.close()
    async with engine.connect() as conn:
        names = (await conn.scalars(sa.select(documents.c.document_name))).all()
    assert names == ["first"]
    assert await counts(engine) == (1, 1)


async def test_request_cancelled_mid_transaction_is_written_whole(
    db: Database, intake: DocumentIntake, engine: AsyncEngine, user: auth.User
) -> None:
    gate = Gate()
    db.before_commit = gate
    sub = submission(user)
    request = asyncio.create_task(intake.submit(sub))
    await gate.entered.wait()  # the rows are written, not yet committed
    request.cancel()  # the client went away
    with pytest.raises(asyncio.CancelledError):
        await request
    gate.release.set()
    await intake.close()
    # Committed whole: a retry with the same Idempotency-Key finds it.
    async with engine.connect() as conn:
        assert await conn.scalar(sa.select(outbox_table.c.id)) == sub.event.id
    assert await counts(engine) == (1, 1)


async def test_a_failure_mid_transaction_leaves_no_half_rows(
    db: Database, intake: DocumentIntake, engine: AsyncEngine, user: auth.User
) -> None:
    def crash() -> None:  # after both rows, before COMMIT
        raise RuntimeError("the writer died here")

    db.before_commit = crash
    results = await asyncio.gather(
        *(intake.submit(submission(user)) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, StorageUnavailable) for r in results)
    assert await counts(engine) == (0, 0)


async def test_failed_transaction_fails_every_submission_and_writes_nothing(
    intake: DocumentIntake, engine: AsyncEngine, user: auth.User
) -> None:
    async with engine.begin() as conn:
        await conn.exec_driver_sql("DROP TABLE outbox_history")
        await conn.exec_driver_sql("DROP TABLE outbox")
    results = await asyncio.gather(
        *(intake.submit(submission(user)) for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, StorageUnavailable) for r in results)
    async with engine.connect() as conn:
        assert await conn.scalar(sa.select(sa.func.count()).select_from(documents)) == 0


@pytest.mark.parametrize(
    ("batch_limit", "batches_in_flight"),
    [
        # One batch: the intake bisects it until the bad row stands alone.
        (50, 4),
        # A batch each: on SQLite the writer merges the batches queued behind
        # the blocker into one INSERT, then runs each alone when it fails.
        (1, 20),
    ],
)
async def test_one_bad_row_fails_alone(
    db: Database,
    engine: AsyncEngine,
    user: auth.User,
    batch_limit: int,
    batches_in_flight: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    intake = DocumentIntake(db, batch_limit=batch_limit, batches_in_flight=batches_in_flight)
    await intake.start()
    gate, blocker = await hold_a_transaction(db, intake, user)
    given = batches_given(db, monkeypatch)
    writer = getattr(db, "_writer", None)  # SQLite's
    transactions = writer.transactions if writer is not None else 0
    # Queued behind the blocker, these share one commit; one names a user
    # that does not exist (a foreign key violation).
    ghost = auth.User(id=999, username="ghost", is_admin=False)
    subs = [submission(user, f"ok{i}") for i in range(10)]
    subs.insert(4, submission(ghost, "bad"))
    tasks = [asyncio.create_task(intake.submit(s)) for s in subs]
    # Every batch given to the database while the blocker holds it.
    await until(lambda: len(given) == -(-len(subs) // batch_limit))
    gate.release.set()
    await blocker
    results = await asyncio.gather(*tasks, return_exceptions=True)
    await intake.close()
    assert isinstance(results[4], StorageUnavailable)
    assert [r for i, r in enumerate(results) if i != 4] == [
        Accepted(s.event.id) for i, s in enumerate(subs) if i != 4
    ]
    assert await counts(engine) == (11, 11)
    if batch_limit >= len(subs):
        # One batch, bisected: [0-4] fails, [5-10] commits; [0-1] commits,
        # [2-4] fails; [2] commits, [3-4] fails; [3] commits, [4] fails alone.
        # The blocker's commit and four (1 + 10 had each row gone alone).
        assert intake.commits == 1 + 4
    elif writer is not None:
        # The blocker's transaction, then ONE for the eleven batches: their
        # merged INSERT failed, and each ran again alone inside it (1 + 11
        # had each batch gone alone).
        assert writer.transactions == transactions + 2


async def test_writer_recovers_after_a_failed_batch(
    db: Database, intake: DocumentIntake, engine: AsyncEngine, user: auth.User
) -> None:
    def fail_once() -> None:
        db.before_commit = None
        raise OSError("disk I/O error")

    db.before_commit = fail_once
    with pytest.raises(StorageUnavailable):
        await intake.submit(submission(user))
    assert isinstance(await intake.submit(submission(user)), Accepted)
    assert await counts(engine) == (1, 1)


async def test_full_queue_is_overloaded_at_once(
    db: Database, engine: AsyncEngine, user: auth.User
) -> None:
    intake = DocumentIntake(db, queue_limit=3, batch_limit=1)
    await intake.start()
    gate = Gate()
    db.before_commit = gate
    in_transaction = asyncio.create_task(intake.submit(submission(user)))
    await gate.entered.wait()
    waiting = [asyncio.create_task(intake.submit(submission(user))) for _ in range(2)]
    await until(lambda: intake.queued == 3)  # one in its transaction, two waiting: the limit
    with pytest.raises(Overloaded):
        await intake.submit(submission(user))
    gate.release.set()
    await asyncio.gather(in_transaction, *waiting)
    await intake.close()
    assert await counts(engine) == (3, 3)


async def test_close_commits_what_is_queued_then_refuses(
    db: Database, engine: AsyncEngine, user: auth.User
) -> None:
    intake = DocumentIntake(db)
    await intake.start()
    pending = [asyncio.create_task(intake.submit(submission(user))) for _ in range(10)]
    await until(lambda: intake.queued == 10)
    await intake.close()
    assert all(isinstance(p.result(), Accepted) for p in pending)
    with pytest.raises(IntakeClosed):
        await intake.submit(submission(user))
    assert await counts(engine) == (10, 10)


async def test_overloaded_api_answers_503_with_retry_after(
    aiohttp_client, settings: Settings, engine: AsyncEngine, user: auth.User
) -> None:
    app = create_app(settings.replace(write_queue_limit=1, write_batch_limit=1))
    client: TestClient = await aiohttp_client(app)
    await client.post("/auth/login", json={"username": "alice", "password": PASSWORD})
    gate = Gate()
    app[DATABASE].before_commit = gate
    held = asyncio.create_task(client.post("/api", json={"documentName": "held"}))
    await gate.entered.wait()
    assert app[INTAKE].queued == 1  # "held", in its transaction: the limit is reached
    response = await client.post("/api", json={"documentName": "refused"})
    assert response.status == 503
    assert response.headers["Retry-After"] == "1"
    body = await response.json(content_type="application/problem+json")
    assert body["code"] == "overloaded"
    gate.release.set()
    assert (await held).status == 200
    assert await counts(engine) == (1, 1)


async def test_keyed_and_plain_requests_in_one_batch_are_each_written_whole(
    db: Database,
    intake: DocumentIntake,
    engine: AsyncEngine,
    user: auth.User,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def keyed(name: str) -> Submission:
        sub = submission(user, name)
        sub.idempotency_key, sub.request_hash = f"key-{name}", "0" * 64
        return sub

    # Submitted together: one batch, which the intake splits, so that the plain
    # ones keep the store's fastest path.
    calls: list[list[str]] = []
    insert = db.insert_submissions

    def spy(batch, hand_off, done):  # type: ignore[no-untyped-def]
        calls.append([p.submission.document_name for p in batch])
        insert(batch, hand_off, done)

    monkeypatch.setattr(db, "insert_submissions", spy)
    subs = [submission(user, "p0"), keyed("k0"), submission(user, "p1"), keyed("k1")]
    results = await asyncio.gather(*(intake.submit(s) for s in subs))
    assert calls == [["p0", "p1"], ["k0", "k1"]]
    assert results == [Accepted(s.event.id) for s in subs]
    async with engine.connect() as conn:
        docs = (await conn.execute(sa.select(documents).order_by(documents.c.id))).all()
        events = set((await conn.scalars(sa.select(outbox_table.c.id))).all())
    assert {(d.document_name, d.event_id, d.idempotency_key) for d in docs} == {
        ("p0", subs[0].event.id, None),
        ("k0", subs[1].event.id, "key-k0"),
        ("p1", subs[2].event.id, None),
        ("k1", subs[3].event.id, "key-k1"),
    }
    assert events == {s.event.id for s in subs}

    # The key still answers for its first request, and writes nothing more.
    again = keyed("k0")
    assert await intake.submit(again) == Accepted(subs[1].event.id, replayed=True)
    assert await counts(engine) == (4, 4)
