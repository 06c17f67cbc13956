"""The delivery worker against the stand-in Inngest: each rule of how it claims, sends and marks."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from service import auth, outbox
from service.config import Settings
from service.delivery.batches import linger_seconds, split_for_request
from service.delivery.retention import Retention
from service.delivery.running import inngest_client
from service.delivery.worker import DeliveryWorker
from service.ids import new_event_id
from service.intake import DocumentIntake, Submission
from service.models import outbox as outbox_table
from service.models import outbox_history
from service.store.database import Database
from service.store.encoding import RawJSON
from tests.fakes.inngest import POISON_ERROR, QUEUE_ERROR, QUEUE_TIMEOUT, Fault, StandIn
from tests.support.net import free_port
from tests.support.wait import until


def make_worker(
    db: Database, settings: Settings, http: aiohttp.ClientSession, **kwargs: Any
) -> DeliveryWorker:
    return DeliveryWorker(
        db, inngest_client(settings, http), settings, rng=random.Random(7), **kwargs
    )


async def enqueue(db: Database, count: int, *, data: dict[str, Any] | None = None) -> list[str]:
    now = datetime.now(UTC)
    events = []
    for i in range(count):
        event_id = new_event_id()
        event = outbox.build_event(
            event_id=event_id,
            name="test/document.requested",
            data=data or {"documentName": f"doc-{i}"},
            user_id=1,
            username="alice",
            ts_ms=int(now.timestamp() * 1000),
        )
        events.append(outbox.NewEvent(event_id, event["name"], RawJSON(json.dumps(event)), now))
    await outbox.enqueue(db, events)
    return [e.id for e in events]


def later(seconds: float = 1.0) -> datetime:
    """A clock ahead of now, for rows whose retry time has not come yet."""
    return datetime.now(UTC) + timedelta(seconds=seconds)


async def states(engine: AsyncEngine) -> dict[str, Any]:
    async with engine.connect() as conn:
        rows = (await conn.execute(sa.select(outbox_table))).all()
    return {row.id: row for row in rows}


async def status_counts(engine: AsyncEngine) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in (await states(engine)).values():
        counts[row.status] = counts.get(row.status, 0) + 1
    return counts


# -- claiming ---------------------------------------------------------------------


async def test_claim_takes_expired_leases_first_then_due_rows_oldest_first(
    db: Database, engine: AsyncEngine
) -> None:
    now = datetime.now(UTC)

    def row(name: str, age: int, **values: Any) -> dict[str, Any]:
        return {
            "id": new_event_id(),
            "event_name": name,
            "payload": RawJSON(json.dumps({"name": name})),
            "status": "pending",
            "attempts": 0,
            "available_at": now - timedelta(seconds=age),
            "created_at": now - timedelta(seconds=age),
            # Every row names every column: an executemany takes its columns from the first.
            "lease_owner": None,
            "lease_token": None,
            "lease_expires_at": None,
            "last_error": None,
            **values,
        }

    lease = {"status": "sending", "lease_owner": "dead", "lease_token": "t"}
    rows = [
        row("due-newer", 1),
        row("expired-newer", 9, **lease, lease_expires_at=now - timedelta(seconds=1)),
        row("due-oldest", 3, last_error="timed out"),
        row("leased", 9, **lease, lease_expires_at=now + timedelta(seconds=30)),
        row("due-newest", 0),
        row("expired-oldest", 9, **lease, lease_expires_at=now - timedelta(seconds=2)),
    ]
    async with engine.begin() as conn:
        await conn.execute(outbox_table.insert(), rows)
    claim = await outbox.claim_batch(db, owner="w", limit=4, lease_seconds=30, now=now)
    names = {r["id"]: r["event_name"] for r in rows}
    assert [names[e.id] for e in claim.events] == [
        "expired-oldest",
        "expired-newer",
        "due-oldest",
        "due-newer",
    ]
    # An earlier outcome (here an error without a status code) marks a row seen.
    assert [e.seen for e in claim.events] == [False, False, True, False]
    assert [json.loads(e.payload)["name"] for e in claim.events] == [
        names[e.id] for e in claim.events
    ]
    leased = await states(engine)
    assert {leased[e.id].lease_token for e in claim.events} == {claim.token}
    assert leased[rows[4]["id"]].status == "pending"  # past the limit
    assert leased[rows[3]["id"]].lease_owner == "dead"  # its lease holds


# -- sending ------------------------------------------------------------------------


async def test_delivers_a_batch_as_one_array_with_the_outbox_ids(
    db: Database, engine: AsyncEngine, delivery_settings: Settings, inngest: StandIn, http
) -> None:
    ids = await enqueue(db, 5)
    worker = make_worker(db, delivery_settings.replace(inngest_env="feature-x"), http)
    stats = await worker.drain_once()
    assert stats.delivered == 5
    [request] = inngest.requests
    assert [e["id"] for e in request["events"]] == ids  # oldest first, the outbox ids
    assert request["headers"]["Content-Type"] == "application/json"
    assert request["headers"]["User-Agent"].startswith("inngest-outbox/")
    assert request["headers"]["X-Inngest-Env"] == "feature-x"
    assert sorted(inngest.accepted_ids) == sorted(ids)
    for row in (await states(engine)).values():
        assert row.status == "delivered"
        assert row.delivered_at is not None
        assert row.attempts == 1
        assert row.last_status_code == 200
        assert row.lease_token is None and row.lease_owner is None


async def test_a_claimed_event_is_sent_exactly_as_stored(
    db: Database, delivery_settings: Settings, inngest: StandIn, http
) -> None:
    # Quotes, backslashes, separators and control characters (escaped in the
    # JSON text), non-ASCII: the claim hands the payload over untouched.
    data = {"documentName": 'a "q" \\ b', "sep": "\u001e\u001f\n\t", "u": "é ✓ \u2028"}
    [event_id] = await enqueue(db, 1, data=data)
    stats = await make_worker(db, delivery_settings, http).drain_once()
    assert stats.delivered == 1
    [event] = inngest.accepted
    assert event["id"] == event_id
    assert event["data"] == data


async def test_an_answer_that_arrives_in_pieces_is_read_whole(
    db: Database, engine: AsyncEngine, delivery_settings: Settings, inngest: StandIn, http
) -> None:
    ids = await enqueue(db, 40)
    inngest.fail_next(Fault.TRICKLE)
    stats = await make_worker(db, delivery_settings, http).drain_once()
    # Not taken for "an unexpected answer" and sent again: delivered at once.
    assert (stats.delivered, stats.retried, stats.requests) == (40, 0, 1)
    assert sorted(inngest.accepted_ids) == sorted(ids)


async def test_batches_are_split_by_event_count(
    db: Database, engine: AsyncEngine, delivery_settings: Settings, inngest: StandIn, http
) -> None:
    ids = await enqueue(db, 25)
    settings = delivery_settings.replace(inngest_max_batch_events=10, worker_batch_size=1000)
    stats = await make_worker(db, settings, http).drain_once()
    assert stats.delivered == 25
    assert [len(r["events"]) for r in inngest.requests] == [10, 10, 5]
    assert sorted(inngest.accepted_ids) == sorted(ids)


async def test_batches_are_split_by_request_bytes(
    db: Database, engine: AsyncEngine, delivery_settings: Settings, inngest: StandIn, http
) -> None:
    await enqueue(db, 20, data={"documentName": "x", "blob": "y" * 400})
    settings = delivery_settings.replace(inngest_max_request_bytes=2048)
    stats = await make_worker(db, settings, http).drain_once()
    assert stats.delivered == 20
    assert len(inngest.requests) > 1
    assert all(r["bytes"] <= 2048 for r in inngest.requests)


def test_split_for_request_is_exact() -> None:
    events = [outbox.ClaimedEvent(str(i), "x" * 10, 0) for i in range(5)]
    # [a,b] is 2 + 10 + 1 + 10 = 23 bytes: two fit in 23, not in 22.
    assert [len(c) for c in split_for_request(events, max_events=10, max_bytes=23)] == [2, 2, 1]
    assert [len(c) for c in split_for_request(events, max_events=10, max_bytes=22)] == [1] * 5
    assert [len(c) for c in split_for_request(events, max_events=3, max_bytes=10**6)] == [3, 2]
    big = [outbox.ClaimedEvent("big", "x" * 100, 0)]
    assert list(split_for_request(big, max_events=10, max_bytes=50)) == [big]


async def test_in_flight_requests_are_bounded(
    db: Database, engine: AsyncEngine, delivery_settings: Settings, inngest: StandIn, http
) -> None:
    await enqueue(db, 40)
    settings = delivery_settings.replace(worker_batch_size=5, worker_max_in_flight=3)
    in_flight = 0
    peak = 0
    release = asyncio.Event()

    async def hold(events: list[dict[str, Any]]) -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        if peak == 3:
            release.set()
        await release.wait()
        in_flight -= 1

    inngest.on_request = hold
    worker = make_worker(db, settings, http)
    task = asyncio.create_task(worker.run())
    async with asyncio.timeout(10):
        await inngest.received(40)
    await worker.stop()
    await task
    assert peak == 3


async def test_no_transaction_is_held_while_a_request_is_in_flight(
    db: Database, engine: AsyncEngine, delivery_settings: Settings, inngest: StandIn, http
) -> None:
    await enqueue(db, 3)
    wrote_during_send: list[str] = []

    async def write_meanwhile(events: list[dict[str, Any]]) -> None:
        # A writer that finds the database locked would wait out busy_timeout
        # (5 s) and fail; with no transaction open it commits at once.
        async with asyncio.timeout(1):
            wrote_during_send.extend(await enqueue(db, 1))

    inngest.on_request = write_meanwhile
    settings = delivery_settings.replace(worker_batch_size=3)
    worker = make_worker(db, settings, http)
    claim = await worker._claim()
    assert claim is not None
    await worker._deliver_claim(claim, release_capacity=False)
    assert len(wrote_during_send) == 1
    assert (await status_counts(engine)) == {"delivered": 3, "pending": 1}


# -- outcomes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "status", "error_start"),
    [
        (Fault.ERROR_500, 500, 'HTTP 500: {"status": 500, "error": "internal error"}'),
        (Fault.TEAPOT, 418, 'HTTP 418: {"status": 418, "error": "teapot"}'),
        (Fault.REDIRECT, 302, "HTTP 302: "),
        (Fault.GARBAGE_200, 200, "unexpected answer to 2 events: HTTP 200: <html>ok</html>"),
    ],
)
async def test_transient_answers_are_retried_with_the_body_recorded(
    db: Database,
    engine: AsyncEngine,
    delivery_settings: Settings,
    inngest: StandIn,
    http,
    fault: Fault,
    status: int,
    error_start: str,
) -> None:
    ids = await enqueue(db, 2)
    inngest.fail_next(fault)
    before = datetime.now(UTC)
    stats = await make_worker(db, delivery_settings, http).drain_once()
    assert stats.retried == 2 and stats.delivered == 0
    for row in (await states(engine)).values():
        assert row.status == "pending"
        assert row.attempts == 1
        assert row.last_status_code == status
        assert row.last_error.startswith(error_start)
        # Full jitter: at most base * 2**0 = 10 s after the failure.
        assert before <= row.available_at <= datetime.now(UTC) + timedelta(seconds=10)
    # Once due, they go through, with the same ids.
    stats = await make_worker(db, delivery_settings, http, clock=lambda: later(11)).drain_once()
    assert stats.delivered == 2
    assert sorted(inngest.accepted_ids) == sorted(ids)


async def test_timeout_is_retried_and_resent_with_the_same_id(
    db: Database, engine: AsyncEngine, delivery_settings: Settings, inngest: StandIn, http
) -> None:
    [event_id] = await enqueue(db, 1)
    inngest.slow_seconds = 1.0
    inngest.fail_next(Fault.SLOW)
    settings = delivery_settings.replace(inngest_timeout_seconds=0.2)
    stats = await make_worker(db, settings, http).drain_once()
    assert stats.deferred == 1
    row = (await states(engine))[event_id]
    assert (row.status, row.attempts) == ("pending", 0)  # no answer: not the event's fault
    assert row.last_error == "timed out after 0.2s"
    assert row.last_status_code is None
    await make_worker(db, settings, http, clock=lambda: later(11)).drain_once()
    # Accepted twice under one id: Inngest runs functions once per id.
    assert inngest.accepted_ids == [event_id, event_id]
    assert (await states(engine))[event_id].status == "delivered"


async def test_connection_refused_is_retried_without_leaking_the_key(
    db: Database, engine: AsyncEngine, delivery_settings: Settings, http
) -> None:
    [event_id] = await enqueue(db, 1)
    settings = delivery_settings.replace(
        inngest_base_url=f"http://127.0.0.1:{free_port()}", inngest_event_key="sekrit-key-123"
    )
    stats = await make_worker(db, settings, http).drain_once()
    assert stats.deferred == 1
    row = (await states(engine))[event_id]
    assert (row.status, row.attempts) == ("pending", 0)
    assert row.last_error.startswith("ClientConnectorError: Cannot connect to host 127.0.0.1")
    assert "sekrit-key-123" not in row.last_error


async def test_dropped_connection_is_retried(
    db: Database, engine: AsyncEngine, delivery_settings: Settings, inngest: StandIn, http
) -> None:
    [event_id] = await enqueue(db, 1)
    inngest.fail_next(Fault.DROP)
    stats = await make_worker(db, delivery_settings, http).drain_once()
    assert stats.deferred == 1
    row = (await states(engine))[event_id]
    assert (row.status, row.attempts) == ("pending", 0)
    assert row.last_error.startswith(("ServerDisconnectedError", "ClientOSError"))


async def test_429_honours_retry_after_and_pauses_the_worker(
    db: Database, engine: AsyncEngine, delivery_settings: Settings, inngest: StandIn, http
) -> None:
    await enqueue(db, 2)
    inngest.retry_after = "7"
    inngest.fail_next(Fault.RATE_LIMIT)
    worker = make_worker(db, delivery_settings, http)
    before = datetime.now(UTC)
    stats = await worker.drain_once()
    assert stats.deferred == 2
    for row in (await states(engine)).values():
        assert (row.status, row.attempts, row.last_status_code) == ("pending", 0, 429)
        assert row.available_at >= before + timedelta(seconds=7)
    assert worker._is_paused()


@pytest.mark.parametrize("fault", [Fault.ERROR_503, Fault.DROP, Fault.RATE_LIMIT])
async def test_an_outage_spends_no_attempts_however_long_it_lasts(
    db: Database, engine: AsyncEngine, delivery_settings: Settings, inngest: StandIn, http, fault
) -> None:
    """Inngest unavailable for far longer than the retry budget: the events wait
    (pending, attempts 0), the worker backs off as a whole, one probe per pause,
    and delivers them all once Inngest is back."""
    ids = await enqueue(db, 3)
    settings = delivery_settings.replace(
        retry_max_attempts=2, retry_base_seconds=1, retry_cap_seconds=8
    )
    inngest.retry_after = None
    outage = 30  # fifteen times the attempts a row may spend
    inngest.fail_next(fault, times=outage)
    now = datetime.now(UTC)
    worker = make_worker(db, settings, http, clock=lambda: now)
    pauses = []
    for _ in range(outage):
        stats = await worker.drain_once()  # one request: the worker pauses after it
        assert worker.health.inngest_available is False
        assert worker.health.can_send is True  # the key is fine
        pause = (worker._paused_until - now).total_seconds()
        pauses.append(pause)
        now += timedelta(seconds=pause)
        rows = (await states(engine)).values()
        assert {(r.status, r.attempts) for r in rows} == {("pending", 0)}
    # One request per pause, and after the first, a probe of one event.
    assert len(inngest.requests) == outage
    assert [len(r["events"]) for r in inngest.requests] == [3] + [1] * (outage - 1)
    assert stats.deferred == 3 + outage - 1 and stats.failed == stats.retried == 0
    # Exponential, half fixed and half jitter, up to the cap.
    assert 0.5 <= pauses[0] <= 1 and 1 <= pauses[1] <= 2 and 2 <= pauses[2] <= 4
    assert all(4 <= p <= 8 for p in pauses[4:])
    async with engine.connect() as conn:
        history = (
            await conn.execute(sa.select(outbox_history.c.kind, outbox_history.c.status_code))
        ).all()
    assert len(history) == 3 + outage - 1  # one entry per row per request it was in
    status = None if fault is Fault.DROP else int(fault.value)
    assert set(history) == {("held", status)}

    stats = await worker.drain_once()  # Inngest is back
    assert sorted(inngest.accepted_ids) == sorted(ids)
    assert worker.health.inngest_available is True
    assert {r.status for r in (await states(engine)).values()} == {"delivered"}


async def test_out_of_attempts_is_failed(
    db: Database, engine: AsyncEngine, delivery_settings: Settings, inngest: StandIn, http
) -> None:
    [event_id] = await enqueue(db, 1)
    settings = delivery_settings.replace(retry_max_attempts=3, retry_base_seconds=0)
    inngest.fail_next(Fault.ERROR_500, times=3)
    worker = make_worker(db, settings, http)
    # With no backoff each retry is due at once, so one burst runs them all.
    stats = await worker.drain_once()
    assert (stats.retried, stats.failed, len(inngest.requests)) == (2, 1, 3)
    row = (await states(engine))[event_id]
    assert (row.status, row.attempts, row.last_status_code) == ("failed", 3, 500)
    assert await worker.drain_once() == stats  # nothing more is claimed
    assert inngest.accepted == []


async def test_a_poison_event_is_isolated_and_the_rest_delivered(
    db: Database, engine: AsyncEngine, delivery_settings: Settings, inngest: StandIn, http
) -> None:
    ids = await enqueue(db, 8)
    poison = ids[5]
    inngest.poison_ids = {poison}
    stats = await make_worker(db, delivery_settings, http).drain_once()
    assert (stats.delivered, stats.failed) == (7, 1)
    rows = await states(engine)
    assert rows[poison].status == "failed"
    assert rows[poison].attempts == 1
    assert rows[poison].last_status_code == 400
    assert rows[poison].last_error == f"HTTP 400: {POISON_ERROR}"
    assert all(rows[i].status == "delivered" for i in ids if i != poison)
    # The prefix the first 400 accepted is not sent again; each other event
    # reaches Inngest exactly once.
    assert sorted(inngest.accepted_ids) == sorted(i for i in ids if i != poison)
    assert inngest.accepted_counts().most_common(1)[0][1] == 1


async def test_two_poison_events_in_one_batch(
    db: Database, engine: AsyncEngine, delivery_settings: Settings, inngest: StandIn, http
) -> None:
    ids = await enqueue(db, 16)
    inngest.poison_ids = {ids[0], ids[11]}
    stats = await make_worker(db, delivery_settings, http).drain_once()
    assert (stats.delivered, stats.failed) == (14, 2)
    assert sorted(inngest.accepted_ids) == sorted(set(ids) - {ids[0], ids[11]})


async def test_413_splits_the_batch(
    db: Database, engine: AsyncEngine, delivery_settings: Settings, inngest: StandIn, http
) -> None:
    ids = await enqueue(db, 8, data={"documentName": "x", "blob": "y" * 300})
    inngest.cloud = True
    inngest.max_body_bytes = 1500  # Cloud refuses what our limit allows
    stats = await make_worker(db, delivery_settings, http).drain_once()
    assert stats.delivered == 8
    assert sorted(inngest.accepted_ids) == sorted(ids)
    assert [r["bytes"] > 1500 for r in inngest.requests].count(True) >= 1


@pytest.mark.parametrize("cloud", [False, True])
async def test_a_single_event_still_too_large_is_failed(
    db: Database,
    engine: AsyncEngine,
    delivery_settings: Settings,
    inngest: StandIn,
    http,
    cloud: bool,
) -> None:
    small = await enqueue(db, 3)
    [big] = await enqueue(db, 1, data={"documentName": "x", "blob": "y" * 5000})
    inngest.max_event_bytes = 2000
    inngest.cloud = cloud  # the open-source server answers 400, Cloud 413
    stats = await make_worker(db, delivery_settings, http).drain_once()
    assert (stats.delivered, stats.failed) == (3, 1)
    row = (await states(engine))[big]
    status = 413 if cloud else 400
    assert (row.status, row.last_status_code) == ("failed", status)
    assert row.last_error.startswith(
        'HTTP 413: {"status": 413, "error": "Event is over the max size: Max 2000'
        if cloud
        else "HTTP 400: Event is over the max size: Max 2000 bytes / Size "
    )
    assert sorted(inngest.accepted_ids) == sorted(small)


# -- Inngest's own failures: 400 too, but no fault of the events ------------------


async def history_of(engine: AsyncEngine, event_id: str) -> list[tuple[str, int | None, str]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            sa.select(outbox_history.c.kind, outbox_history.c.status_code, outbox_history.c.error)
            .where(outbox_history.c.event_id == event_id)
            .order_by(outbox_history.c.id)
        )
        return [tuple(r) for r in rows]


async def test_a_queue_outage_marks_nothing_delivered_and_fails_nothing(
    db: Database, engine: AsyncEngine, delivery_settings: Settings, inngest: StandIn, http
) -> None:
    ids = await enqueue(db, 6)
    inngest.queue_down = True  # every answer: 400 {"ids": [""], ...}
    stats = await make_worker(db, delivery_settings, http).drain_once()
    assert (stats.delivered, stats.failed, stats.retried) == (0, 0, 6)
    assert len(inngest.requests) == 1  # nothing bisected
    error = f"HTTP 400, Inngest failed to take the events: {QUEUE_ERROR}"
    for event_id, row in (await states(engine)).items():
        assert (row.status, row.attempts, row.last_status_code) == ("pending", 1, 400)
        assert row.last_error == error
        assert await history_of(engine, event_id) == [("retry", 400, error)]
    assert inngest.accepted == []

    inngest.queue_down = False
    stats = await make_worker(db, delivery_settings, http, clock=lambda: later(11)).drain_once()
    assert stats.delivered == 6
    assert sorted(inngest.accepted_ids) == sorted(ids)
    assert set(inngest.accepted_counts().values()) == {1}


async def test_a_queue_failure_mid_batch_delivers_the_events_before_it(
    db: Database, engine: AsyncEngine, delivery_settings: Settings, inngest: StandIn, http
) -> None:
    await enqueue(db, 8)
    inngest.queue_fault_at = 3
    inngest.fail_next(Fault.QUEUE_ERROR)
    stats = await make_worker(db, delivery_settings, http).drain_once()
    assert (stats.delivered, stats.retried, stats.failed) == (3, 5, 0)
    assert len(inngest.requests) == 1
    sent = [e["id"] for e in inngest.requests[0]["events"]]
    rows = await states(engine)
    assert [rows[i].status for i in sent] == ["delivered"] * 3 + ["pending"] * 5
    assert {rows[i].last_error for i in sent[3:]} == {
        f"HTTP 400, Inngest failed to take the events: {QUEUE_TIMEOUT}"
    }
    stats = await make_worker(db, delivery_settings, http, clock=lambda: later(11)).drain_once()
    assert stats.delivered == 5
    assert sorted(inngest.accepted_ids) == sorted(sent)
    assert set(inngest.accepted_counts().values()) == {1}


async def test_a_queue_outage_past_the_attempts_fails_with_inngests_error(
    db: Database, engine: AsyncEngine, delivery_settings: Settings, inngest: StandIn, http
) -> None:
    [event_id] = await enqueue(db, 1)
    settings = delivery_settings.replace(retry_max_attempts=3, retry_base_seconds=0)
    inngest.queue_down = True
    stats = await make_worker(db, settings, http).drain_once()
    assert (stats.retried, stats.failed, len(inngest.requests)) == (2, 1, 3)
    row = (await states(engine))[event_id]
    assert (row.status, row.attempts, row.last_status_code) == ("failed", 3, 400)
    kinds = [kind for kind, _, _ in await history_of(engine, event_id)]
    assert kinds == ["retry", "retry", "failed"]
    assert row.last_error.startswith("HTTP 400, Inngest failed to take the events")


@pytest.mark.parametrize("fault", [None, Fault.FORBIDDEN, Fault.NOT_FOUND])
async def test_bad_event_key_fails_nothing_and_reports_unhealthy_until_a_send_succeeds(
    db: Database,
    engine: AsyncEngine,
    delivery_settings: Settings,
    inngest: StandIn,
    http,
    caplog: pytest.LogCaptureFixture,
    fault: Fault | None,
) -> None:
    ids = await enqueue(db, 3)
    if fault is None:
        settings = delivery_settings.replace(inngest_event_key="wrong-key-456")
    else:
        settings = delivery_settings
        inngest.fail_next(fault, times=2)
    worker = make_worker(db, settings, http)
    with caplog.at_level(logging.ERROR):
        await worker.drain_once()
        worker._paused_until = None  # skip the back-off, to show the log is once
        await worker.drain_once()
    assert worker.health.can_send is False
    assert "refused the event key" in worker.health.detail
    for row in (await states(engine)).values():
        assert (row.status, row.attempts, row.lease_token) == ("pending", 0, None)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "check INNGEST_EVENT_KEY" in errors[0].getMessage()
    assert "wrong-key-456" not in caplog.text and inngest.event_key not in caplog.text

    fixed = make_worker(db, delivery_settings, http)
    fixed._can_send = False  # as the worker above left things
    await fixed.drain_once()
    assert fixed.health.can_send is True
    assert sorted(inngest.accepted_ids) == sorted(ids)


async def test_late_answer_after_lease_expiry_does_not_overwrite_the_newer_state(
    db: Database, engine: AsyncEngine, delivery_settings: Settings, inngest: StandIn, http
) -> None:
    [event_id] = await enqueue(db, 1)
    first_request = asyncio.Event()
    answer_first = asyncio.Event()
    calls = 0

    async def hold_first(events: list[dict[str, Any]]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            first_request.set()
            await answer_first.wait()

    inngest.on_request = hold_first
    inngest.fail_next(Fault.ERROR_500)  # the slow worker's request will fail...
    slow = make_worker(db, delivery_settings.replace(worker_lease_seconds=30), http)
    slow_task = asyncio.create_task(slow.drain_once())
    await first_request.wait()
    # ...after its lease has run out: another worker, a minute later, takes the row.
    fast = make_worker(db, delivery_settings, http, clock=lambda: later(60))
    assert (await fast.drain_once()).delivered == 1
    answer_first.set()
    stats = await slow_task
    assert stats.lost_leases == 1
    row = (await states(engine))[event_id]
    assert (row.status, row.attempts) == ("delivered", 1)  # not put back to pending


# -- latency -------------------------------------------------------------------------


async def test_a_commit_wakes_the_in_process_worker_at_once(
    aiohttp_client, delivery_settings: Settings, engine: AsyncEngine, user: auth.User, inngest
) -> None:
    from service.app import create_app
    from tests.conftest import PASSWORD

    # A 60 s poll: only the wake-up can deliver within the test's timeout.
    app = create_app(delivery_settings.replace(worker_poll_seconds=60, run_worker=True))
    client = await aiohttp_client(app)
    await client.post("/auth/login", json={"username": "alice", "password": PASSWORD})
    response = await client.post("/api", json={"documentName": "now.txt"})
    event_id = (await response.json())["id"]
    async with asyncio.timeout(5):
        await inngest.received(1)
    assert inngest.accepted_ids == [event_id]


async def test_a_retry_is_sent_when_due_not_at_the_next_poll(
    db: Database, engine: AsyncEngine, delivery_settings: Settings, inngest: StandIn, http
) -> None:
    [event_id] = await enqueue(db, 1)
    inngest.fail_next(Fault.ERROR_500)
    settings = delivery_settings.replace(
        worker_poll_seconds=60, retry_base_seconds=0.2, retry_cap_seconds=0.2
    )
    worker = make_worker(db, settings, http)
    task = asyncio.create_task(worker.run())
    try:
        async with asyncio.timeout(5):
            await inngest.received(1)
    finally:
        await worker.stop()
        await task
    assert inngest.accepted_ids == [event_id]
    assert len(inngest.requests) == 2


# -- shutdown ------------------------------------------------------------------------


async def test_stop_lets_an_in_flight_send_finish(
    db: Database, engine: AsyncEngine, delivery_settings: Settings, inngest: StandIn, http
) -> None:
    [event_id] = await enqueue(db, 1)
    inngest.slow_seconds = 0.3
    inngest.fail_next(Fault.SLOW)
    worker = make_worker(db, delivery_settings, http)
    task = asyncio.create_task(worker.run())
    async with asyncio.timeout(5):
        await inngest.received(1)  # accepted; the answer is still 0.3 s away
    await worker.stop(grace_seconds=5)
    await task
    assert (await states(engine))[event_id].status == "delivered"


async def test_stop_past_the_grace_period_releases_the_lease(
    db: Database, engine: AsyncEngine, delivery_settings: Settings, inngest: StandIn, http
) -> None:
    [event_id] = await enqueue(db, 1)
    hold = inngest.hold_requests()
    worker = make_worker(db, delivery_settings, http)
    task = asyncio.create_task(worker.run())
    await hold.arrived.wait()
    await worker.stop(grace_seconds=0.1)
    await task
    row = (await states(engine))[event_id]
    assert (row.status, row.attempts, row.lease_token) == ("pending", 0, None)
    assert worker.stats.released == 1
    hold.release()


async def test_stop_releases_claimed_chunks_that_were_not_sent(
    db: Database, engine: AsyncEngine, delivery_settings: Settings, inngest: StandIn, http
) -> None:
    await enqueue(db, 6)
    settings = delivery_settings.replace(inngest_max_batch_events=2, worker_batch_size=6)
    worker = make_worker(db, settings, http)

    async def stop_after_first(events: list[dict[str, Any]]) -> None:
        worker._stopping.set()  # as stop() does; the first chunk still completes

    inngest.on_request = stop_after_first
    claim = await worker._claim()
    assert claim is not None
    await worker._deliver_claim(claim, release_capacity=False)
    assert await status_counts(engine) == {"delivered": 2, "pending": 4}
    assert worker.stats.released == 4


# -- retention ---------------------------------------------------------------------


async def test_retention_deletes_only_old_delivered_rows_in_small_batches(
    db: Database, engine: AsyncEngine, delivery_settings: Settings, http
) -> None:
    old = await enqueue(db, 25)
    recent = await enqueue(db, 3)
    failed = await enqueue(db, 1)
    pending = await enqueue(db, 1)
    now = datetime.now(UTC)
    claim = await outbox.claim_batch(db, owner="w", limit=100, lease_seconds=30, now=now)
    leased = {e.id for e in claim.events}
    assert leased >= set(old + recent + failed)
    await outbox.mark_delivered(db, old, claim.token, now=now - timedelta(days=8))
    await outbox.mark_delivered(db, recent, claim.token, now=now - timedelta(days=6))
    await outbox.mark_failed(db, failed, claim.token, error="x", status_code=400)
    await outbox.release(db, pending, claim.token)
    retention = Retention(db, delivery_settings.replace(retention_batch=10))
    assert await retention.purge_once() == 25
    remaining = await states(engine)
    assert set(remaining) == set(recent + failed + pending)
    assert {remaining[i].status for i in failed + pending} == {"failed", "pending"}
    assert await retention.purge_once() == 0
    assert retention.purged == 25


async def test_retention_can_be_turned_off(db: Database, delivery_settings: Settings, http) -> None:
    ids = await enqueue(db, 2)
    now = datetime.now(UTC)
    claim = await outbox.claim_batch(db, owner="w", limit=10, lease_seconds=30, now=now)
    await outbox.mark_delivered(db, ids, claim.token, now=now - timedelta(days=365))
    retention = Retention(db, delivery_settings.replace(retention_days=0))
    assert await retention.purge_once() == 0


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_a_claim_committed_while_stopping_is_released_not_left_leased(
    db: Database, engine: AsyncEngine, delivery_settings: Settings, http, monkeypatch
) -> None:
    import threading

    await enqueue(db, 5)
    writer_busy = threading.Event()
    go_on = threading.Event()

    def slow_job(conn: Any) -> None:  # holds the writer thread: the claim queues behind it
        writer_busy.set()
        go_on.wait(timeout=10)

    claiming = asyncio.Event()
    claim_batch = outbox.claim_batch

    async def claim_batch_and_tell(*args: Any, **kwargs: Any) -> outbox.Claim:
        claiming.set()  # the claim is queued before this task next waits
        return await claim_batch(*args, **kwargs)

    monkeypatch.setattr(outbox, "claim_batch", claim_batch_and_tell)
    blocker = asyncio.create_task(db.write(slow_job))
    await asyncio.to_thread(writer_busy.wait, 10)
    worker = make_worker(db, delivery_settings, http)
    task = asyncio.create_task(worker.run())
    await claiming.wait()  # run() is now waiting for its claim
    stopping = asyncio.create_task(worker.stop(grace_seconds=1))
    # One turn of the loop: stop()'s first step, which sets the stop. Not a
    # wait for time: the claim cannot commit before go_on below.
    await asyncio.sleep(0)
    go_on.set()  # the claim commits after the stop began
    await blocker
    await stopping
    task.cancel()  # as the app's cleanup does once stop() returns
    await asyncio.gather(task, return_exceptions=True)
    assert worker.stats.claimed == 5
    assert await status_counts(engine) == {"pending": 5}


# -- hand-off: the API's commits go straight to its own process's worker ------------


def new_submission(user: auth.User) -> Submission:
    event_id = new_event_id()
    event = outbox.build_event(
        event_id=event_id,
        name="test/document.requested",
        data={"documentName": "handed.txt"},
        user_id=user.id,
        username=user.username,
        ts_ms=int(datetime.now(UTC).timestamp() * 1000),
    )
    return Submission(
        user_id=user.id,
        document_name="handed.txt",
        event=outbox.NewEvent(
            event_id, event["name"], RawJSON(json.dumps(event)), datetime.now(UTC)
        ),
    )


async def test_committed_events_are_handed_to_the_running_worker_without_a_claim(
    db: Database, engine: AsyncEngine, delivery_settings: Settings, inngest: StandIn, http,
    user: auth.User,
) -> None:  # fmt: skip
    # A 60 s poll: only the hand-off can deliver within the test's timeout.
    worker = make_worker(db, delivery_settings.replace(worker_poll_seconds=60), http)
    intake = DocumentIntake(db)
    await intake.start()
    intake.hand_off_to(worker)
    task = asyncio.create_task(worker.run())
    try:
        await until(lambda: worker.health.running)  # the loop starts
        accepted = [await intake.submit(new_submission(user)) for _ in range(3)]
        async with asyncio.timeout(5):
            await inngest.received(3)
    finally:
        await worker.stop()
        await task
        await intake.close()
    assert sorted(inngest.accepted_ids) == sorted(a.event_id for a in accepted)
    assert worker.stats.handed_off == worker.stats.claimed == worker.stats.delivered == 3
    rows = await states(engine)
    assert {(r.status, r.attempts, r.lease_token) for r in rows.values()} == {
        ("delivered", 1, None)
    }


async def test_handed_off_rows_are_leased_in_their_commit_and_released_at_stop(
    db: Database, engine: AsyncEngine, delivery_settings: Settings, inngest: StandIn, http,
    user: auth.User,
) -> None:  # fmt: skip
    worker = make_worker(db, delivery_settings, http)
    intake = DocumentIntake(db)
    await intake.start()
    intake.hand_off_to(worker)
    worker._running = True  # as if its loop were between two claims
    accepted = await intake.submit(new_submission(user))
    # Committed already leased to the worker: no claim needed, none possible.
    row = (await states(engine))[accepted.event_id]
    assert (row.status, row.lease_owner, row.attempts) == ("sending", worker.owner, 0)
    assert row.lease_expires_at > datetime.now(UTC)
    assert (await make_worker(db, delivery_settings, http).drain_once()).claimed == 0
    intake.hand_off_to(None)
    worker._running = False  # its loop has exited
    await worker.stop()
    await intake.close()
    # Not sent, so given back: pending, attempts unspent, no lease.
    row = (await states(engine))[accepted.event_id]
    assert (row.status, row.lease_token, row.attempts) == ("pending", None, 0)
    assert inngest.requests == []


async def test_a_worker_that_dies_after_the_commit_loses_nothing(
    db: Database, engine: AsyncEngine, delivery_settings: Settings, inngest: StandIn, http,
    user: auth.User,
) -> None:  # fmt: skip
    class DiesAfterTheCommit:
        """Offers a lease, then is gone: the process was killed."""

        def offer(self) -> outbox.HandOff:
            return outbox.HandOff(
                "dead-worker", "dead-token", datetime.now(UTC) + timedelta(seconds=60)
            )

        def accept(self, hand_off: outbox.HandOff, events: list[outbox.NewEvent]) -> None:
            pass

        def decline(self, hand_off: outbox.HandOff) -> None:
            pass

    intake = DocumentIntake(db)
    await intake.start()
    intake.hand_off_to(DiesAfterTheCommit())
    accepted = await intake.submit(new_submission(user))
    await intake.close()
    survivor = make_worker(db, delivery_settings, http)
    # Leased to the dead worker: nobody else sends it before its lease expires ...
    assert (await survivor.drain_once()).claimed == 0
    # ... and then any worker does, with the same event id.
    survivor = make_worker(db, delivery_settings, http, clock=lambda: later(61))
    stats = await survivor.drain_once()
    assert (stats.claimed, stats.delivered) == (1, 1)
    assert inngest.accepted_ids == [accepted.event_id]


@pytest.mark.parametrize("why", ["not running", "stopping", "paused", "inngest down", "busy"])
async def test_no_hand_off_when_the_worker_would_not_send_soon(
    db: Database, delivery_settings: Settings, http, why: str
) -> None:
    worker = make_worker(db, delivery_settings.replace(worker_max_in_flight=1), http)
    if why != "not running":
        worker._running = True
    if why == "stopping":
        worker._stopping.set()
    elif why == "paused":
        worker._pause_for(30)
    elif why == "inngest down":
        worker._outage_failures = 1
    elif why == "busy":
        await worker._capacity.acquire()  # every send slot taken
    assert worker.offer() is None


async def test_rows_written_pending_are_claimed_however_many_are_handed_off(
    db: Database, delivery_settings: Settings, http, user: auth.User
) -> None:
    # Pending rows (a replay, another process's writes) beside a steady stream
    # of hand-offs: looked for at a wake-up, and at least every poll interval.
    [pending_id] = await enqueue(db, 1)
    worker = make_worker(db, delivery_settings.replace(worker_poll_seconds=60), http)
    worker._running = True
    handed = new_submission(user).event
    hand_off = worker.offer()
    assert hand_off is not None
    worker.accept(hand_off, [handed])
    worker._outbox_looked_at = time.monotonic()  # just looked
    claim = await worker._next_claim()
    assert claim is not None and [e.id for e in claim.events] == [handed.id]

    worker.accept(hand_off := worker.offer(), [new_submission(user).event])  # type: ignore[arg-type]
    worker._outbox_looked_at = time.monotonic() - 61  # a poll interval ago
    claim = await worker._next_claim()
    assert claim is not None and [e.id for e in claim.events] == [pending_id]

    worker.wake()  # a wake-up: the outbox first, however recent the last look
    worker._outbox_looked_at = time.monotonic()
    claim = await worker._next_claim()  # the outbox is empty now: the hand-off
    assert claim is not None and claim.token == hand_off.token
    worker._running = False


async def test_a_handed_off_group_past_its_lease_is_not_sent(
    db: Database, delivery_settings: Settings, http, user: auth.User
) -> None:
    # Held through an outage longer than the lease: the rows are any worker's again.
    worker = make_worker(db, delivery_settings, http)
    expired = outbox.HandOff(worker.owner, "old-token", datetime.now(UTC) - timedelta(seconds=1))
    worker._offers_out = 1
    worker.accept(expired, [new_submission(user).event])
    assert worker._take_handed() is None
    assert worker.stats.claimed == 0


@pytest.mark.parametrize(
    ("taken", "seconds"), [(1, 0.0002), (50, 0.01), (100, 0.02), (999, 0.02), (0, 0.0)]
)
def test_the_linger_grows_with_the_batch_up_to_worker_linger_seconds(
    taken: int, seconds: float
) -> None:
    # A lone event after an idle spell is not held back; under load batches
    # grow until the worker lingers the whole 20 ms.
    assert linger_seconds(0.02, taken) == pytest.approx(seconds)


async def test_handed_off_rows_do_not_spin_the_loop_while_inngest_is_unavailable(
    db: Database, delivery_settings: Settings, http, user: auth.User, monkeypatch
) -> None:
    # They wait for the outage's end: the idle worker sleeps until a wake-up
    # (or its poll), not at once because handed-off rows are waiting.
    async def nothing_due(engine: object) -> None:
        return None

    monkeypatch.setattr(outbox, "next_due_at", nothing_due)
    worker = make_worker(db, delivery_settings.replace(worker_poll_seconds=60), http)
    worker._running = True
    worker.accept(worker.offer(), [new_submission(user).event])  # type: ignore[arg-type]
    worker._outage_failures = 1
    idle = asyncio.create_task(worker._idle())
    # Not a wait for something: a few turns of the loop, in which an idle
    # that does not wait would end.
    for _ in range(5):
        await asyncio.sleep(0)
    assert not idle.done()
    worker.wake()
    await idle
    worker._running = False


# -- what runs beside the worker -------------------------------------------------------


async def test_a_crashed_background_task_is_logged_and_shown_in_the_workers_health(
    db: Database,
    delivery_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from service.delivery.running import delivering
    from service.metrics import Metrics

    async def broken(self: Retention) -> None:
        raise RuntimeError("the retention query failed for good")

    monkeypatch.setattr(Retention, "run", broken)
    async with delivering(db, delivery_settings, wake=asyncio.Event(), metrics=Metrics()) as (
        worker,
        tasks,
    ):
        async with asyncio.timeout(5):
            await tasks.ended.wait()
        health = worker.health
    assert (health.running, health.detail) == (False, "outbox-retention crashed: RuntimeError")
    [record] = [r for r in caplog.records if r.getMessage() == "outbox-retention crashed"]
    assert record.levelname == "ERROR" and record.exc_info is not None


async def test_delivering_runs_the_worker_and_stops_it_at_exit(
    db: Database, delivery_settings: Settings, inngest: StandIn
) -> None:
    from service.delivery.running import delivering
    from service.metrics import Metrics

    ids = await enqueue(db, 3)
    wake = asyncio.Event()
    async with delivering(db, delivery_settings, wake=wake, metrics=Metrics()) as (worker, tasks):
        wake.set()
        async with asyncio.timeout(10):
            await inngest.received(3)
        assert worker.health.running is True
    assert sorted(inngest.accepted_ids) == sorted(ids)
    assert worker.health.running is False
    assert tasks.ended.is_set()  # the worker's loop returned: stopped, not crashed
