"""Who sees what of /readyz and /metrics, and what /readyz costs."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa
from aiohttp.test_utils import TestClient

from service import auth, migrate
from service.app import create_app
from service.config import Settings
from service.keys import DATABASE
from service.store.database import Database
from tests.support.net import free_port
from tests.support.service import METRICS_TOKEN, OPERATOR
from tests.test_admin import admin, admin_user  # noqa: F401 (fixtures)
from tests.test_api import problem

PUBLIC_READY = {
    "status": "ok",
    "checks": {
        "database": {"state": "ok"},
        "s3": {"state": "ok"},
        "worker": {"state": "elsewhere"},
    },
}


async def readyz(client: TestClient, **headers: str) -> tuple[int, dict[str, Any]]:
    response = await client.get("/readyz", headers=headers)
    return response.status, await response.json()


# -- /readyz ---------------------------------------------------------------------


async def test_anonymous_callers_see_each_checks_state_only(client: TestClient) -> None:
    assert await readyz(client) == (200, PUBLIC_READY)


async def test_anonymous_callers_see_that_a_check_fails_not_why(
    aiohttp_client, settings: Settings, engine
) -> None:
    client = await aiohttp_client(create_app(settings.replace(s3_bucket="missing-bucket-x")))
    response = await client.get("/readyz")
    assert response.status == 503
    text = await response.text()
    assert "missing-bucket-x" not in text
    assert await response.json() == {
        "status": "unavailable",
        "checks": {
            "database": {"state": "ok"},
            "s3": {"state": "unavailable"},
            "worker": {"state": "elsewhere"},
        },
    }


async def test_a_user_who_is_not_an_admin_sees_states_only(logged_in: TestClient) -> None:
    assert await readyz(logged_in) == (200, PUBLIC_READY)


async def test_an_admin_sees_the_details(admin: TestClient) -> None:  # noqa: F811
    status, body = await readyz(admin)
    assert status == 200
    assert body["checks"]["database"] == {"state": "ok", "revision": migrate.head_revision()}
    assert body["checks"]["s3"]["detail"].startswith("bucket ")
    assert body["checks"]["worker"]["detail"] == "serve --no-worker: worker processes deliver"


async def test_the_metrics_token_shows_the_details(client: TestClient) -> None:
    status, body = await readyz(client, **OPERATOR)
    assert status == 200
    assert body["checks"]["database"] == {"state": "ok", "revision": migrate.head_revision()}
    for wrong in (f"Bearer {METRICS_TOKEN}x", f"Basic {METRICS_TOKEN}", METRICS_TOKEN):
        assert await readyz(client, Authorization=wrong) == (200, PUBLIC_READY)


def count_revision_reads(db: Database) -> list[str]:
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "alembic_version" in statement:
            seen.append(statement)

    sa.event.listen(db.engine.sync_engine, "before_cursor_execute", record)
    return seen


async def test_a_burst_of_readyz_reads_the_schema_once(client: TestClient) -> None:
    reads = count_revision_reads(client.app[DATABASE])
    answers = await asyncio.gather(*(client.get("/readyz") for _ in range(50)))
    assert [a.status for a in answers] == [200] * 50
    assert len(reads) == 1
    assert (await client.get("/readyz", headers=OPERATOR)).status == 200
    assert len(reads) == 1  # within the second, the same answer


# -- /metrics ----------------------------------------------------------------------


async def test_metrics_need_the_token_when_there_is_one(client: TestClient) -> None:
    for headers in ({}, {"Authorization": "Bearer not-the-token"}):
        response = await client.get("/metrics", headers=headers)
        body = await problem(response, 401, "invalid_token")
        assert body["detail"] == "Send Authorization: Bearer with the METRICS_TOKEN."
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="metrics"'
    response = await client.get("/metrics", headers=OPERATOR)
    assert response.status == 200
    assert "inngest_outbox_http_requests_total" in await response.text()


async def test_metrics_without_token_or_port_are_open(
    aiohttp_client, settings: Settings, engine
) -> None:
    client = await aiohttp_client(create_app(settings.replace(metrics_token=None)))
    assert (await client.get("/metrics")).status == 200


async def test_a_metrics_port_serves_metrics_and_details_apart(
    aiohttp_client, settings: Settings, engine
) -> None:
    port = free_port()
    client = await aiohttp_client(
        create_app(settings.replace(metrics_token=None, metrics_port=port))
    )
    response = await client.get("/metrics")
    body = await problem(response, 404, "not_found")
    assert body["detail"] == "Metrics are served on the metrics port."
    assert await readyz(client) == (200, PUBLIC_READY)
    async with aiohttp.ClientSession() as http:
        response = await http.get(f"http://127.0.0.1:{port}/metrics")
        assert response.status == 200
        assert 'route="/metrics"' in await response.text()  # the API's own requests too
        response = await http.get(f"http://127.0.0.1:{port}/readyz")
        assert response.status == 200
        checks = (await response.json())["checks"]
        assert checks["database"] == {"state": "ok", "revision": migrate.head_revision()}
        assert checks["s3"]["state"] == "ok" and "detail" in checks["s3"]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_with_both_the_token_opens_metrics_on_the_service_port(
    aiohttp_client, settings: Settings, engine, user: auth.User
) -> None:
    client = await aiohttp_client(create_app(settings.replace(metrics_port=free_port())))
    assert (await client.get("/metrics", headers=OPERATOR)).status == 200
    assert (await client.get("/metrics")).status == 401
