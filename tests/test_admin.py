"""The admin API and page, /metrics, /readyz, a client's own view, and JSON logs."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import pytest_asyncio
import sqlalchemy as sa
from aiohttp.test_utils import TestClient
from sqlalchemy.ext.asyncio import AsyncEngine

from service import auth, migrate, outbox
from service.app import create_app
from service.config import Settings
from service.ids import new_event_id
from service.keys import DATABASE, WORKER
from service.logs import configure_logging
from service.models import users
from service.store.database import Database
from service.store.encoding import RawJSON
from service.web.middlewares import request_id_var
from tests.conftest import PASSWORD
from tests.fakes.inngest import POISON_ERROR, Fault, StandIn
from tests.support.service import OPERATOR
from tests.test_api import problem
from tests.test_delivery import enqueue, make_worker
from tests.test_operations import fail_for_good

ADMIN = "root"


@pytest_asyncio.fixture
async def admin_user(db: Database) -> auth.User:
    return await auth.create_user(db, ADMIN, PASSWORD, is_admin=True)


async def log_in(client: TestClient, username: str) -> None:
    response = await client.post("/auth/login", json={"username": username, "password": PASSWORD})
    assert response.status == 200, await response.text()


@pytest_asyncio.fixture
async def admin(aiohttp_client, settings: Settings, admin_user: auth.User) -> TestClient:
    client = await aiohttp_client(create_app(settings))
    await log_in(client, ADMIN)
    return client


ADMIN_ROUTES = [
    ("GET", "/admin/api/stats"),
    ("GET", "/admin/api/events"),
    ("GET", "/admin/api/events/x"),
    ("POST", "/admin/api/replay"),
]


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
async def test_the_admin_api_needs_a_login(client: TestClient, method: str, path: str) -> None:
    response = await client.request(method, path, json={"ids": ["x"]})
    body = await problem(response, 401, "unauthenticated")
    assert body["instance"] == path


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
async def test_the_admin_api_is_403_for_users_without_the_flag(
    logged_in: TestClient, method: str, path: str
) -> None:
    response = await logged_in.request(method, path, json={"ids": ["x"]})
    assert await problem(response, 403, "forbidden") == {
        "type": "https://inngest-outbox.dev/problems/forbidden",
        "title": "Administrators only",
        "status": 403,
        "code": "forbidden",
        "detail": "This needs an admin user.",
        "instance": path,
    }


async def test_taking_the_flag_away_works_at_once(
    admin: TestClient, db: Database, admin_user: auth.User
) -> None:
    assert (await admin.get("/admin/api/stats")).status == 200
    await db.write(
        lambda conn: conn.execute(
            users.update().where(users.c.id == admin_user.id).values(is_admin=False)
        )
    )
    await problem(await admin.get("/admin/api/stats"), 403, "forbidden")


async def test_stats(
    admin: TestClient, db: Database, delivery_settings: Settings, http, inngest: StandIn
) -> None:
    await fail_for_good(db, delivery_settings, http, inngest, 2)
    await enqueue(db, 3)
    response = await admin.get("/admin/api/stats")
    assert response.status == 200
    body = await response.json()
    assert body["stats"]["counts"] == {"pending": 3, "sending": 0, "delivered": 0, "failed": 2}
    assert body["stats"]["backlog"] == 3
    assert body["stats"]["failures_last_hour"] == 2
    assert len(body["timeline"]) == 60
    assert sum(m["failed"] for m in body["timeline"]) == 2
    assert body["timeline"][-1]["backlog"] == 3


async def test_list_pages_with_a_cursor_and_filters(admin: TestClient, db: Database) -> None:
    ids = []
    for _ in range(6):
        ids += await enqueue(db, 20)
    seen: list[str] = []
    url = "/admin/api/events?limit=50"
    pages = 0
    while url:
        body = await (await admin.get(url)).json()
        seen += [e["id"] for e in body["events"]]
        pages += 1
        url = (
            f"/admin/api/events?limit=50&cursor={body['nextCursor']}" if body["nextCursor"] else ""
        )
    assert pages == 3
    assert seen == sorted(ids, reverse=True)
    body = await (await admin.get("/admin/api/events?status=failed")).json()
    assert body == {"events": [], "nextCursor": None}
    body = await (await admin.get("/admin/api/events?status=pending&since=1h&limit=1")).json()
    event = body["events"][0]
    assert event["id"] == max(ids)
    assert set(event) == {
        "id",
        "name",
        "status",
        "attempts",
        "createdAt",
        "availableAt",
        "deliveredAt",
        "lastStatusCode",
        "lastError",
        "origin",
    }
    assert event["origin"] is None  # posted to /api


@pytest.mark.parametrize(
    ("query", "detail"),
    [
        ("status=sent", "'sent' is not a status: use one of pending, sending, delivered, failed"),
        ("limit=0", "limit must be between 1 and 500"),
        ("limit=ten", "limit must be a whole number"),
        (
            "since=tuesday",
            "'tuesday' is not a time: use ISO 8601 (2026-11-23T10:00:00Z) or an age (2h, 7d)",
        ),
    ],
)
async def test_a_bad_query_is_400(admin: TestClient, query: str, detail: str) -> None:
    body = await problem(await admin.get(f"/admin/api/events?{query}"), 400, "invalid_query")
    assert body["detail"] == detail


async def test_one_event_with_its_history(
    admin: TestClient, db: Database, delivery_settings: Settings, http, inngest: StandIn
) -> None:
    [event_id] = await fail_for_good(db, delivery_settings, http, inngest, 1)
    body = await (await admin.get(f"/admin/api/events/{event_id}")).json()
    assert body["id"] == event_id and body["status"] == "failed"
    assert body["event"]["id"] == event_id
    [entry] = body["history"]
    assert entry["kind"] == "failed" and entry["statusCode"] == 400
    body = await problem(await admin.get("/admin/api/events/nope"), 404, "event_not_found")
    assert body["detail"] == "No event with this id."


async def test_replay_by_ids_and_by_filter_wakes_the_worker(
    aiohttp_client,
    db: Database,
    delivery_settings: Settings,
    admin_user: auth.User,
    http,
    inngest: StandIn,
) -> None:
    failed = await fail_for_good(db, delivery_settings, http, inngest, 3)
    client = await aiohttp_client(create_app(delivery_settings.replace(run_worker=True)))
    await log_in(client, ADMIN)

    response = await client.post("/admin/api/replay", json={"ids": failed[:1], "dryRun": True})
    assert await response.json() == {
        "dryRun": True,
        "matched": 1,
        "replayed": [],
        "wouldReplay": failed[:1],
        "skipped": [],
    }
    response = await client.post("/admin/api/replay", json={"ids": [failed[0], "nope"]})
    assert await response.json() == {
        "dryRun": False,
        "matched": 2,
        "replayed": [{"id": failed[0], "newId": None, "was": "failed"}],
        "wouldReplay": [],
        "skipped": [{"id": "nope", "reason": "not found"}],
    }
    async with asyncio.timeout(10):
        await inngest.wait_until(lambda s: failed[0] in s.accepted_ids)

    response = await client.post(
        "/admin/api/replay", json={"status": "failed", "since": "1h", "newId": True}
    )
    body = await response.json()
    assert sorted(r["id"] for r in body["replayed"]) == sorted(failed[1:])
    new_ids = [r["newId"] for r in body["replayed"]]
    async with asyncio.timeout(10):
        await inngest.wait_until(lambda s: set(new_ids) <= set(s.accepted_ids))
    detail = await (await client.get(f"/admin/api/events/{failed[1]}")).json()
    assert detail["originId"] == failed[1]
    # (The delivery's entry may or may not be written yet: Inngest has answered,
    # the mark may still be on its way.)
    [replayed] = [h for h in detail["history"] if h["kind"] == "replayed"]
    assert replayed["actor"] == "root (admin)"
    assert replayed["detail"] == f"was failed; new id {detail['id']}, old id {failed[1]}"


@pytest.mark.parametrize(
    ("body", "field", "rule"),
    [
        ({}, "status", "required"),
        ({"status": "pending"}, "status", "required"),
        ({"ids": "x"}, "ids", "type"),
        ({"ids": []}, "ids", "type"),
        ({"ids": [1]}, "ids", "type"),
        ({"ids": ["a"], "status": "failed"}, "ids", "exclusive"),
        ({"ids": ["a"], "newId": "yes"}, "newId", "type"),
        ({"status": "failed", "name": 3}, "name", "type"),
        ({"status": "failed", "since": "soon"}, "since", "format"),
        ({"status": "failed", "since": "1h", "until": "later"}, "until", "format"),
    ],
)
async def test_a_bad_replay_body_is_400(
    admin: TestClient, body: dict[str, Any], field: str, rule: str
) -> None:
    answer = await problem(await admin.post("/admin/api/replay", json=body), 400, "invalid_field")
    assert (answer["field"], answer["rule"]) == (field, rule)


async def test_replay_needs_json(admin: TestClient) -> None:
    response = await admin.post("/admin/api/replay", data="ids=x")
    await problem(response, 415, "unsupported_media_type")


# -- the page ---------------------------------------------------------------------


async def test_the_page_asks_for_a_login_first(client: TestClient) -> None:
    response = await client.get("/admin")
    assert response.status == 200
    assert response.content_type == "text/html"
    text = await response.text()
    assert '<form id="login">' in text
    assert "Failed events" not in text


async def test_the_page_is_403_for_users_without_the_flag(logged_in: TestClient) -> None:
    response = await logged_in.get("/admin")
    assert response.status == 403
    assert "<h1>Administrators only</h1>" in await response.text()


async def test_the_page_shows_stats_chart_and_failed_events(
    admin: TestClient, db: Database, delivery_settings: Settings, http, inngest: StandIn
) -> None:
    failed = await fail_for_good(db, delivery_settings, http, inngest, 2)
    await enqueue(db, 1)
    response = await admin.get("/admin")
    assert response.status == 200
    text = await response.text()
    assert '<tr data-stat="failed"><th>failed</th><td>2</td></tr>' in text
    assert '<tr data-stat="backlog"><th>backlog</th><td>1</td></tr>' in text
    for name in ("delivered", "failed", "backlog"):
        points = re.search(rf'class="series-{name}"[^>]* points="([^"]*)"', text)
        assert points is not None and len(points.group(1).split()) == 60
    for event_id in failed:
        assert f'<tr data-id="{event_id}">' in text
    assert POISON_ERROR in text  # the last error
    nonce = re.search(r'<script nonce="([^"]+)">', text)
    assert nonce is not None
    policy = response.headers["Content-Security-Policy"]
    assert f"script-src 'nonce-{nonce.group(1)}'" in policy
    assert "frame-ancestors 'none'" in policy


async def test_the_page_escapes_what_it_shows(
    admin: TestClient, db: Database, delivery_settings: Settings, http, inngest: StandIn
) -> None:
    [event_id] = await enqueue(db, 1)
    claim = await outbox.claim_batch(
        db, owner="w", limit=1, lease_seconds=30, now=datetime.now(UTC)
    )
    await outbox.mark_failed(
        db, [event_id], claim.token, error="<script>alert(1)</script>", status_code=400
    )
    text = await (await admin.get("/admin")).text()
    assert "<script>alert(1)</script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text


# -- /metrics, /readyz ----------------------------------------------------------------


def pending_event() -> outbox.NewEvent:
    """An event waiting for an hour (written behind the worker's back)."""
    event_id = new_event_id()
    created = datetime.now(UTC) - timedelta(hours=1)
    payload = RawJSON(json.dumps({"id": event_id, "name": "x", "data": {}}))
    return outbox.NewEvent(event_id, "x", payload, created)


def metric(text: str, name: str, **labels: str) -> float | None:
    rendered = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.escape(name + (f"{{{rendered}}}" if labels else "")) + r" (\S+)"
    found = re.search(rf"^{pattern}$", text, re.MULTILINE)
    return float(found.group(1)) if found else None


async def test_metrics(
    alice_on, db: Database, delivery_settings: Settings, inngest: StandIn
) -> None:
    client = await alice_on(
        run_worker=True,
        inngest_base_url=delivery_settings.inngest_base_url,
        inngest_event_key=delivery_settings.inngest_event_key,
    )
    inngest.fail_next(Fault.ERROR_500)  # the first send is retried

    def refuse_bad(events: list[dict[str, Any]]) -> None:
        inngest.poison_ids.update(e["id"] for e in events if e["data"]["documentName"] == "bad")

    inngest.on_request = refuse_bad
    ids = []
    for name in ("d0", "d1", "bad"):
        response = await client.post("/api", json={"documentName": name})
        ids.append((await response.json())["id"])
    await client.post("/api", data="x")  # 415
    await client.request("PROPFIND", "/api")  # a method nobody should label
    async with asyncio.timeout(10):
        await inngest.wait_until(lambda s: set(ids[:2]) <= set(s.accepted_ids))
    worker = client.app[WORKER]
    async with asyncio.timeout(10):
        await worker.wait_for(lambda stats: stats.delivered == 2 and stats.failed == 1)
    await worker.stop()
    await outbox.enqueue(db, [pending_event()])  # stays pending
    response = await client.get("/metrics", headers=OPERATOR)
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = await response.text()
    requests = "inngest_outbox_http_requests_total"
    assert metric(text, requests, route="/api", method="POST", status="200") == 3
    assert metric(text, requests, route="/api", method="POST", status="415") == 1
    assert metric(text, requests, route="unmatched", method="other", status="405") == 1
    assert metric(text, "inngest_outbox_http_request_duration_seconds_count", route="/api") == 4
    assert metric(text, "inngest_outbox_rows", status="pending") == 1
    assert metric(text, "inngest_outbox_rows", status="failed") == 1
    assert metric(text, "inngest_outbox_rows", status="delivered") is None  # not counted per scrape
    assert metric(text, "inngest_outbox_deliveries_total") == 2
    assert metric(text, "inngest_outbox_failures_total") == 1
    assert metric(text, "inngest_outbox_retries_total") >= 1
    # How the sends split between outcomes depends on how the rows were batched
    # (the refused event may travel with the others, then its 400 accepts them).
    sends = "inngest_outbox_send_duration_seconds_count"
    kinds = ("accepted", "rejected", "transient")
    outcomes = {o: metric(text, sends, outcome=o) or 0 for o in kinds}
    assert outcomes["transient"] == 1
    assert sum(outcomes.values()) == inngest.request_count
    assert metric(text, "inngest_outbox_oldest_pending_age_seconds") >= 3600


async def test_readyz_reports_a_schema_behind_the_code(client: TestClient, db: Database) -> None:
    await db.write(
        lambda conn: conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0003'")
    )
    response = await client.get("/readyz", headers=OPERATOR)
    assert response.status == 503
    body = await response.json()
    assert body["checks"]["database"] == {
        "state": "unavailable",
        "detail": f"schema at revision 0003, this code needs {migrate.head_revision()}: "
        "run migrate",
    }


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_readyz_reports_the_rows_process_ended_and_the_api_still_accepts(
    alice_on, engine: AsyncEngine
) -> None:
    client = await alice_on()
    assert (await client.get("/readyz")).status == 200
    rows = client.app[DATABASE]._rows
    assert rows is not None and rows.running and rows._transport is not None
    rows._transport.kill()
    await asyncio.shield(rows._output_closed)  # type: ignore[arg-type]
    response = await client.get("/readyz", headers=OPERATOR)
    assert response.status == 200
    body = await response.json()
    assert body["status"] == "ok"
    assert body["checks"]["database"] == {
        "state": "degraded",
        "revision": migrate.head_revision(),
        "detail": "the SQLite rows process ended; the writer thread writes the intake's rows "
        "(slower) until the service restarts",
    }
    response = await client.post("/api", json={"documentName": "after"})
    assert response.status == 200
    event_id = (await response.json())["id"]
    async with engine.connect() as conn:
        stored = await conn.scalar(
            sa.text("SELECT count(*) FROM outbox WHERE id = :id"), {"id": event_id}
        )
    assert stored == 1


async def test_readyz_reports_a_worker_that_cannot_send(
    alice_on, inngest: StandIn, delivery_settings: Settings
) -> None:
    client = await alice_on(
        run_worker=True,
        inngest_base_url=delivery_settings.inngest_base_url,
        inngest_event_key="wrong-key",
    )
    response = await client.post("/api", json={"documentName": "a"})
    assert response.status == 200
    async with asyncio.timeout(10):
        await inngest.wait_until(lambda s: s.request_count >= 1)
        while (await client.get("/readyz")).status == 200:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    body = await (await client.get("/readyz", headers=OPERATOR)).json()
    assert body["checks"]["worker"]["state"] == "unavailable"
    assert "refused the event key" in body["checks"]["worker"]["detail"]


# -- a client's own view -------------------------------------------------------------


async def test_a_client_sees_its_own_events_only(
    logged_in: TestClient, aiohttp_client, settings: Settings, db: Database
) -> None:
    response = await logged_in.post("/api", json={"documentName": "a.pdf"})
    event_id = (await response.json())["id"]
    response = await logged_in.get(f"/api/events/{event_id}")
    assert response.status == 200
    view = await response.json()
    assert view == {
        "id": event_id,
        "documentName": "a.pdf",
        "createdAt": view["createdAt"],
        "status": "pending",
    }
    await auth.create_user(db, "bob", PASSWORD)
    bob = await aiohttp_client(create_app(settings))
    await log_in(bob, "bob")
    body = await problem(await bob.get(f"/api/events/{event_id}"), 404, "event_not_found")
    assert body["detail"] == "You posted no event with this id."
    await problem(await logged_in.get("/api/events/not-an-id"), 404, "event_not_found")
    anonymous = await aiohttp_client(create_app(settings))
    await problem(await anonymous.get(f"/api/events/{event_id}"), 401, "unauthenticated")


async def test_a_client_sees_delivery_and_failure(
    logged_in: TestClient, db: Database, delivery_settings: Settings, http, inngest: StandIn
) -> None:
    ok = (await (await logged_in.post("/api", json={"documentName": "ok"})).json())["id"]
    bad = (await (await logged_in.post("/api", json={"documentName": "bad"})).json())["id"]
    inngest.poison_ids.add(bad)
    await make_worker(db, delivery_settings, http).drain_once()
    delivered = await (await logged_in.get(f"/api/events/{ok}")).json()
    assert delivered["status"] == "delivered"
    assert delivered["deliveredAt"].endswith("+00:00")
    failed = await (await logged_in.get(f"/api/events/{bad}")).json()
    assert failed["status"] == "failed"
    assert failed["attempts"] == 1
    assert failed["error"] == f"HTTP 400: {POISON_ERROR}"


# -- logs -----------------------------------------------------------------------------


@pytest.fixture
def restore_logging():  # type: ignore[no-untyped-def]
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_logs_carry_the_request_id(capsys, restore_logging) -> None:  # type: ignore[no-untyped-def]
    configure_logging("INFO", "json")
    token = request_id_var.set("req-123")
    try:
        logging.getLogger("service.test").warning("hello %s", "world")
    finally:
        request_id_var.reset(token)
    logging.getLogger("service.test").info("outside")
    first, second = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    assert {k: first[k] for k in ("level", "logger", "request_id", "message")} == {
        "level": "WARNING",
        "logger": "service.test",
        "request_id": "req-123",
        "message": "hello world",
    }
    assert second["request_id"] == "-"
