"""POST /e/{key}: Inngest's event API in front of the outbox.

The wire format is the official SDKs' (read in their source): the Python SDK
(``inngest/_internal/client_lib/client.py``, ``_send``) and the JavaScript SDK
(``inngest/components/Inngest.ts``, ``send``) POST a JSON array of events to
``{event_api_base_url}/e/{event_key}`` with ``x-inngest-event-id-seed:
"<ms>,<base64 of 10 bytes>"`` (the same on every retry of one send) and read
``{"ids": [...], "status": 200}``, raising on ``error``. Inngest's own
handler (``pkg/api/api.go`` ``ReceiveEvent``) also takes a single object.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from aiohttp import web
from aiohttp.test_utils import TestClient, make_mocked_request
from sqlalchemy.ext.asyncio import AsyncEngine

from service import operations, relay_keys
from service.app import create_app
from service.config import Settings
from service.keys import DATABASE, INTAKE, METRICS
from service.models import outbox
from service.models import relay_keys as relay_keys_table
from service.store.database import Database
from service.web.middlewares import RequestIdAccessLogger
from tests.fakes.inngest import StandIn
from tests.support.net import answer_to_a_cut_request
from tests.support.service import poll_until
from tests.support.wait import until
from tests.test_intake import Gate


def seed_header() -> str:
    return f"{1_700_000_000_000},{base64.b64encode(os.urandom(10)).decode()}"


@pytest.fixture
async def key(db: Database) -> str:
    return await relay_keys.add_key(db, "shop", now=datetime.now(UTC))


@pytest.fixture
async def relay_client(aiohttp_client, settings: Settings, key: str) -> TestClient:
    return await aiohttp_client(create_app(settings.replace(relay_key_check_seconds=0.0)))


async def rows(engine: AsyncEngine) -> list[dict]:
    async with engine.connect() as conn:
        result = await conn.execute(
            sa.select(
                outbox.c.id,
                outbox.c.event_name,
                outbox.c.origin,
                outbox.c.status,
                sa.cast(outbox.c.payload, sa.Text).label("payload"),
            ).order_by(outbox.c.created_at, outbox.c.id)
        )
        return [dict(row._mapping) for row in result]


async def test_a_batch_is_stored_with_its_origin_and_answered_with_its_ids(
    relay_client: TestClient, key: str, engine: AsyncEngine
) -> None:
    events = [
        {"name": "shop/cart.created", "data": {"cart": 1}},
        {
            "name": "shop/cart.paid",
            "data": {"cart": 1, "big": 12345678901234567890123, "f": 1.5},
            "id": "cart-1-paid",
            "ts": 1_700_000_000_123,
            "v": "2024-01-01.1",
            "user": {"id": "u1"},
        },
    ]
    response = await relay_client.post(f"/e/{key}", json=events)
    assert response.status == 200
    assert response.content_type == "application/json"
    answer = await response.json()
    assert answer["status"] == 200 and set(answer) == {"ids", "status"}
    first_id, second_id = answer["ids"]
    assert second_id == "cart-1-paid"
    stored = {row["id"]: row for row in await rows(engine)}
    assert set(stored) == {first_id, second_id}
    assert {row["origin"] for row in stored.values()} == {"shop"}
    assert {row["status"] for row in stored.values()} == {"pending"}
    assert stored[second_id]["event_name"] == "shop/cart.paid"
    # Kept exactly as sent (an integer past 64 bits too); the first gets an id and a ts.
    assert json.loads(stored[second_id]["payload"]) == events[1]
    first = json.loads(stored[first_id]["payload"])
    assert first == {**events[0], "id": first_id, "ts": first["ts"]}
    assert abs(first["ts"] - datetime.now(UTC).timestamp() * 1000) < 60_000


async def test_a_single_event_object_is_taken_as_inngest_takes_it(
    relay_client: TestClient, key: str, engine: AsyncEngine
) -> None:
    response = await relay_client.post(f"/e/{key}", json={"name": "one", "id": "only-one"})
    assert (response.status, await response.json()) == (200, {"ids": ["only-one"], "status": 200})
    assert [row["id"] for row in await rows(engine)] == ["only-one"]


async def test_fields_are_read_in_any_case_as_go_reads_them_and_kept_as_sent(
    relay_client: TestClient, key: str, engine: AsyncEngine
) -> None:
    events = [
        {"Name": "mixed/case", "ID": "own-id", "Ts": 1_700_000_000_000, "extra": 1},
        # The last non-null of a field spelled twice wins.
        {"name": "first", "NAME": "second", "id": None, "Id": "later-id"},
    ]
    response = await relay_client.post(f"/e/{key}", json=events)
    assert (response.status, await response.json()) == (
        200,
        {"ids": ["own-id", "later-id"], "status": 200},
    )
    stored = {row["id"]: row for row in await rows(engine)}
    assert stored["own-id"]["event_name"] == "mixed/case"
    assert stored["later-id"]["event_name"] == "second"
    # Nothing added where the event had its own id and ts, in whatever case.
    assert json.loads(stored["own-id"]["payload"]) == events[0]
    later = json.loads(stored["later-id"]["payload"])
    assert isinstance(later.pop("ts"), int)  # none sent: the time of receipt
    assert later == events[1]


async def test_an_empty_batch_is_answered_as_inngest_answers_it(
    relay_client: TestClient, key: str, engine: AsyncEngine
) -> None:
    response = await relay_client.post(f"/e/{key}", json=[])
    assert (response.status, await response.json()) == (200, {"ids": [""], "status": 200})
    assert await rows(engine) == []


async def test_a_body_that_trickles_in_is_408_stores_nothing_and_ends_the_connection(
    aiohttp_client, settings: Settings, key: str, engine: AsyncEngine
) -> None:
    client = await aiohttp_client(create_app(settings.replace(body_timeout_seconds=0.3)))
    head, body = await answer_to_a_cut_request(
        client.server.host,
        client.server.port,
        f"POST /e/{key} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        'Content-Length: 100\r\n\r\n[{"name": '.encode(),
    )
    assert head.startswith(b"HTTP/1.1 408 ")
    assert b"\r\nConnection: close\r\n" in head
    assert json.loads(body) == {"error": "The request body did not arrive in time", "status": 408}
    assert await rows(engine) == []


async def test_an_unknown_key_is_refused_and_nothing_is_stored(
    relay_client: TestClient, engine: AsyncEngine
) -> None:
    response = await relay_client.post("/e/" + "0" * 64, json=[{"name": "x"}])
    assert response.status == 401
    assert await response.json() == {"error": "Event key not found", "status": 401}
    assert await rows(engine) == []


async def test_a_revoked_key_is_refused_and_nothing_is_stored(
    relay_client: TestClient, key: str, db: Database, engine: AsyncEngine
) -> None:
    assert (await relay_client.post(f"/e/{key}", json=[{"name": "before"}])).status == 200
    assert await relay_keys.revoke_key(db, "shop", now=datetime.now(UTC)) is True
    response = await relay_client.post(f"/e/{key}", json=[{"name": "after"}])
    assert response.status == 401
    assert await response.json() == {"error": "Event key not found", "status": 401}
    assert [row["event_name"] for row in await rows(engine)] == ["before"]


async def test_a_key_is_trusted_for_the_check_interval(
    aiohttp_client, settings: Settings, key: str, db: Database
) -> None:
    client = await aiohttp_client(create_app(settings.replace(relay_key_check_seconds=3600.0)))
    assert (await client.post(f"/e/{key}", json=[{"name": "a"}])).status == 200
    await relay_keys.revoke_key(db, "shop", now=datetime.now(UTC))
    # Within RELAY_KEY_CHECK_SECONDS this process still takes it (documented).
    assert (await client.post(f"/e/{key}", json=[{"name": "b"}])).status == 200


@pytest.mark.parametrize(
    ("event", "error"),
    [
        ({"data": {}}, "event 1: event name is empty"),
        ({"name": ""}, "event 1: event name is empty"),
        (
            {"name": "inngest/function.failed"},
            "event 1: event name is reserved for internal use: inngest/function.failed",
        ),  # noqa: E501
        ({"name": "Inngest/x"}, "event 1: event name is reserved for internal use: Inngest/x"),
        ({"name": 7}, "event 1: name must be a string"),
        ({"name": "x", "data": [1]}, "event 1: data must be an object"),
        ({"name": "x", "user": "bob"}, "event 1: user must be an object"),
        ({"name": "x", "v": 2}, "event 1: v must be a string"),
        ({"name": "x", "id": 12}, "event 1: id must be a string"),
        ({"name": "x", "ts": 1_700_000_000}, "event 1: timestamp is before Jan 1, 1980"),
        ({"name": "x", "ts": 5_000_000_000_000}, "event 1: timestamp is after Jan 1, 2100"),
        ({"name": "x", "ts": 1.7e12}, "event 1: ts must be an integer (milliseconds)"),
        ({"name": "x", "TS": "now"}, "event 1: ts must be an integer (milliseconds)"),
        ({"name": "x", "id": "i" * 256}, "event 1: id is longer than 255 characters"),
        ({"name": "n" * 256}, "event 1: event name is longer than 255 characters"),
        ("not an event", "event 1: an event must be a JSON object"),
    ],
)
async def test_one_invalid_event_refuses_the_whole_batch(
    relay_client: TestClient, key: str, engine: AsyncEngine, event: object, error: str
) -> None:
    batch = [{"name": "fine"}, event, {"name": "fine too"}]
    response = await relay_client.post(f"/e/{key}", json=batch)
    assert response.status == 400
    assert await response.json() == {"error": error, "status": 400, "ids": []}
    assert await rows(engine) == []


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b'"a string"', "Request body must contain an event object or an array of event objects"),
        (
            b"[{",
            "invalid JSON: Expecting property name enclosed in double quotes at line 1, column 3",
        ),  # noqa: E501
        (b'[{"name": NaN}]', "invalid JSON: NaN is not valid JSON"),
        (b'[{"name": "\\ud800"}]', "event 0: a string holds an unpaired UTF-16 surrogate"),
    ],
)
async def test_a_body_that_is_not_events_is_refused(
    relay_client: TestClient, key: str, engine: AsyncEngine, body: bytes, error: str
) -> None:
    response = await relay_client.post(
        f"/e/{key}", data=body, headers={"Content-Type": "application/json"}
    )
    assert response.status == 400
    assert await response.json() == {"error": error, "status": 400, "ids": []}
    assert await rows(engine) == []


async def test_more_than_5000_events_are_refused(
    relay_client: TestClient, key: str, engine: AsyncEngine
) -> None:
    response = await relay_client.post(f"/e/{key}", json=[{"name": "x"}] * 5001)
    assert response.status == 400
    assert await response.json() == {
        "error": "Cannot have more than 5000 events in a batch",
        "status": 400,
        "ids": [],
    }
    assert await rows(engine) == []


async def test_an_event_over_the_size_limit_refuses_the_batch(
    aiohttp_client, settings: Settings, key: str, engine: AsyncEngine
) -> None:
    client = await aiohttp_client(create_app(settings.replace(max_event_bytes=2048)))
    big = {"name": "x", "data": {"blob": "b" * 2100}, "id": "big"}
    size = len(json.dumps(big, separators=(",", ":"))) + len(',"ts":1700000000000')
    response = await client.post(f"/e/{key}", json=[{"name": "small"}, big])
    assert response.status == 400
    answer = await response.json()
    assert answer == {
        "error": f"event 1: Event is over the max size: Max 2048 bytes / Size {size} bytes",
        "status": 400,
        "ids": [],
    }
    assert await rows(engine) == []


async def test_a_body_over_the_limit_is_refused(
    aiohttp_client, settings: Settings, key: str, engine: AsyncEngine
) -> None:
    client = await aiohttp_client(create_app(settings.replace(relay_max_body_bytes=4096)))
    batch = [{"name": "x", "data": {"n": "n" * 100}}] * 50
    response = await client.post(f"/e/{key}", json=batch)
    assert response.status == 413
    assert await response.json() == {
        "error": "Request body is over the max size of 4096 bytes",
        "status": 413,
        "ids": [],
    }
    assert await rows(engine) == []


async def test_a_client_id_sent_twice_is_stored_once(
    relay_client: TestClient, key: str, engine: AsyncEngine
) -> None:
    first = await relay_client.post(f"/e/{key}", json=[{"name": "a", "id": "order-7"}])
    assert (await first.json())["ids"] == ["order-7"]
    again = await relay_client.post(
        f"/e/{key}", json=[{"name": "b", "id": "new"}, {"name": "a2", "id": "order-7"}]
    )
    assert (again.status, await again.json()) == (200, {"ids": ["new", "order-7"], "status": 200})
    stored = await rows(engine)
    assert sorted(row["id"] for row in stored) == ["new", "order-7"]
    # The first one sent is kept, as it was.
    assert [r["event_name"] for r in stored if r["id"] == "order-7"] == ["a"]


async def test_an_id_twice_in_one_batch_is_stored_once(
    relay_client: TestClient, key: str, engine: AsyncEngine
) -> None:
    response = await relay_client.post(
        f"/e/{key}", json=[{"name": "a", "id": "same"}, {"name": "b", "id": "same"}]
    )
    assert (await response.json())["ids"] == ["same", "same"]
    assert [(r["id"], r["event_name"]) for r in await rows(engine)] == [("same", "a")]


async def test_a_retry_with_the_same_seed_gets_the_same_ids_and_stores_nothing_twice(
    relay_client: TestClient, key: str, engine: AsyncEngine
) -> None:
    seed = seed_header()
    batch = [{"name": "a"}, {"name": "b", "id": "own"}, {"name": "c"}]
    headers = {"x-inngest-event-id-seed": seed}
    first = await (await relay_client.post(f"/e/{key}", json=batch, headers=headers)).json()
    retry = await (await relay_client.post(f"/e/{key}", json=batch, headers=headers)).json()
    assert first == retry
    assert first["ids"][1] == "own"
    assert len(set(first["ids"])) == 3
    assert sorted(r["id"] for r in await rows(engine)) == sorted(first["ids"])
    # The seed's milliseconds lead the derived UUIDv7s.
    assert first["ids"][0].replace("-", "")[:12] == f"{1_700_000_000_000:012x}"
    other = {"x-inngest-event-id-seed": seed_header()}
    fresh = await (await relay_client.post(f"/e/{key}", json=batch, headers=other)).json()
    assert not {fresh["ids"][0], fresh["ids"][2]} & set(first["ids"])
    assert len(await rows(engine)) == 5


async def test_the_same_seed_from_another_key_gets_other_ids(
    relay_client: TestClient, key: str, db: Database, engine: AsyncEngine
) -> None:
    other_key = await relay_keys.add_key(db, "billing", now=datetime.now(UTC))
    headers = {"x-inngest-event-id-seed": seed_header()}
    one = await (await relay_client.post(f"/e/{key}", json=[{"name": "a"}], headers=headers)).json()
    two = await (
        await relay_client.post(f"/e/{other_key}", json=[{"name": "a"}], headers=headers)
    ).json()
    assert one["ids"] != two["ids"]
    assert sorted(r["origin"] for r in await rows(engine)) == ["billing", "shop"]


async def test_a_malformed_seed_gives_new_ids(relay_client: TestClient, key: str) -> None:
    headers = {"x-inngest-event-id-seed": "soon,not-base64!"}
    one = await (await relay_client.post(f"/e/{key}", json=[{"name": "a"}], headers=headers)).json()
    two = await (await relay_client.post(f"/e/{key}", json=[{"name": "a"}], headers=headers)).json()
    assert one["ids"] != two["ids"]


async def test_a_failed_commit_stores_none_of_the_request(
    relay_client: TestClient, key: str, engine: AsyncEngine
) -> None:
    db = relay_client.app[DATABASE]

    def fail() -> None:
        raise RuntimeError("the disk is full")

    db.before_commit = fail
    response = await relay_client.post(f"/e/{key}", json=[{"name": "a"}, {"name": "b"}])
    assert response.status == 503
    assert (await response.json())["status"] == 503
    db.before_commit = None
    assert await rows(engine) == []


async def test_concurrent_requests_share_commits_and_each_is_whole(
    relay_client: TestClient, key: str, engine: AsyncEngine
) -> None:
    intake = relay_client.app[INTAKE]
    commits_before = intake.commits
    # Every commit waits until all thirty requests are waiting for one: without
    # that, how many arrive during a commit is a matter of timing.
    gate = Gate()
    relay_client.app[DATABASE].before_commit = gate
    batches = [[{"name": f"r{r}", "id": f"r{r}-e{e}"} for e in range(20)] for r in range(30)]
    posts = [asyncio.create_task(relay_client.post(f"/e/{key}", json=b)) for b in batches]
    await until(lambda: intake.queued == 30, wait_seconds=30)
    gate.release.set()
    answers = await asyncio.gather(*posts)
    relay_client.app[DATABASE].before_commit = None
    assert [a.status for a in answers] == [200] * 30
    stored = await rows(engine)
    assert len(stored) == 600
    assert {r["id"] for r in stored} == {e["id"] for b in batches for e in b}
    # Group commit: thirty requests did not take thirty commits.
    assert intake.commits - commits_before < 30


async def test_the_key_is_marked_used_and_counted_per_key(
    relay_client: TestClient, key: str, db: Database
) -> None:
    await relay_client.post(f"/e/{key}", json=[{"name": "a", "id": "x1"}, {"name": "b"}])
    await relay_client.post(f"/e/{key}", json=[{"name": "a", "id": "x1"}])
    [info] = await relay_keys.list_keys(db)
    assert info.name == "shop" and info.last_used_at is not None and info.revoked_at is None
    text = relay_client.app[METRICS].render().decode()
    assert 'inngest_outbox_relay_events_received_total{key="shop"} 3.0' in text
    assert 'inngest_outbox_relay_events_stored_total{key="shop"} 2.0' in text


async def test_the_key_never_appears_in_error_bodies_or_the_service_logs(
    relay_client: TestClient, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service")
    response = await relay_client.get(f"/e/{key}")  # no such method: the middleware answers
    assert response.status == 405
    assert (await response.json())["instance"] == "/e/{key}"
    response = await relay_client.post(f"/e/{key}", json=[{"name": ""}])
    assert key not in await response.text()
    assert key not in caplog.text


def test_the_access_log_shows_the_route_not_the_key(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="test.access")
    access = RequestIdAccessLogger(logging.getLogger("test.access"), '"%r" %s')
    request = make_mocked_request("POST", "/e/secret-key-123")
    access.log(request, web.Response(status=200), 0.001)
    assert caplog.messages == ['"POST /e/REDACTED HTTP/1.1" 200']


async def test_relayed_events_are_delivered_by_the_worker_with_their_ids(
    aiohttp_client, delivery_settings: Settings, key: str, inngest: StandIn, engine: AsyncEngine
) -> None:
    client = await aiohttp_client(create_app(delivery_settings.replace(run_worker=True)))
    sent = [{"name": "shop/a", "data": {"n": 1}, "id": "a-1"}, {"name": "shop/b"}]
    answer = await (await client.post(f"/e/{key}", json=sent)).json()
    async with asyncio.timeout(10):
        delivered = await inngest.received(2)
    assert [e["id"] for e in delivered] == answer["ids"]
    assert delivered[0] == sent[0] | {"ts": delivered[0]["ts"]}
    assert delivered[1]["name"] == "shop/b" and delivered[1]["id"] == answer["ids"][1]

    async def all_delivered() -> bool:
        return {r["status"] for r in await rows(engine)} == {"delivered"}

    await poll_until(all_delivered, wait_seconds=10)


async def test_key_hashes_are_stored_never_keys(
    db: Database, key: str, engine: AsyncEngine
) -> None:
    async with engine.connect() as conn:
        stored = (await conn.execute(sa.select(relay_keys_table))).one()
    assert key not in [str(v) for v in stored]
    assert stored.key_hash == relay_keys.hash_key(key)


async def test_list_and_show_name_the_key_a_relayed_event_came_from(
    relay_client: TestClient, key: str, db: Database
) -> None:
    await relay_client.post(f"/e/{key}", json=[{"name": "shop/a", "id": "from-shop"}])
    page = await operations.list_events(db, operations.Filter())
    assert [(e.id, e.origin) for e in page.events] == [("from-shop", "shop")]
    detail = await operations.get_event(db, "from-shop")
    assert detail is not None and detail.origin == "shop"
    assert detail.event["name"] == "shop/a" and detail.document_name is None


async def test_requests_for_a_key_share_one_lookup_and_a_stale_one_is_looked_up_again(
    db: Database, key: str
) -> None:
    from service.relay_keys import RelayKeys

    lookups: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
        if statement.startswith("SELECT relay_keys.name"):
            lookups.append(statement)

    sa.event.listen(db.engine.sync_engine, "before_cursor_execute", count)
    try:
        clock = [0.0]
        keys = RelayKeys(db, check_seconds=5.0, clock=lambda: clock[0])
        assert await asyncio.gather(*(keys.origin_of(key) for _ in range(50))) == ["shop"] * 50
        assert len(lookups) == 1
        clock[0] = 4.9  # still fresh
        assert await keys.origin_of(key) == "shop" and len(lookups) == 1
        clock[0] = 5.0  # stale: looked up again, once for all who ask meanwhile
        await relay_keys.revoke_key(db, "shop", now=datetime.now(UTC))
        assert await asyncio.gather(*(keys.origin_of(key) for _ in range(20))) == [None] * 20
        assert len(lookups) == 2
        # A request that gives up does not end the lookup the others wait for.
        clock[0] = 10.0
        first = asyncio.ensure_future(keys.origin_of(key))
        second = asyncio.ensure_future(keys.origin_of(key))
        await asyncio.sleep(0)  # both waiting on the one lookup
        first.cancel()
        assert await second is None
        assert len(lookups) == 3
    finally:
        sa.event.remove(db.engine.sync_engine, "before_cursor_execute", count)
