"""Faults of what the service depends on, each on a real service process:
Inngest down for far longer than the retry budget, PostgreSQL down and back,
a full disk under SQLite, S3 credentials revoked while running, and SIGKILL
at random moments under load, repeated. Each shows nothing acknowledged is lost.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.fakes.inngest import StandIn
from tests.support.net import free_port
from tests.support.postgres import PostgresServer, PostgresUnavailable, start_postgres
from tests.support.s3 import MotoS3
from tests.support.service import (
    OPERATOR,
    USER,
    ServiceProcess,
    http_session,
    log_in,
    poll_until,
    query,
    set_up_database,
)
from tests.support.service import (
    PASSWORD as SERVICE_PASSWORD,
)

pytestmark = pytest.mark.slow

PROBLEM = "application/problem+json"
FAST_RETRIES = {
    # A send gives up (1 s) well before its lease ends (2 s): no lease expires mid-send.
    "INNGEST_TIMEOUT_SECONDS": "1",
    "RETRY_BASE_SECONDS": "0.05",
    "RETRY_CAP_SECONDS": "0.2",
    "RETRY_MAX_ATTEMPTS": "2",
    "WORKER_POLL_SECONDS": "0.2",
    "WORKER_LEASE_SECONDS": "2",
}


def problem_body(code: str, title: str, detail: str, instance: str = "/api") -> dict[str, Any]:
    return {
        "type": f"https://inngest-outbox.dev/problems/{code}",
        "title": title,
        "status": 503,
        "code": code,
        "detail": detail,
        "instance": instance,
    }


DATABASE_UNAVAILABLE = problem_body(
    "database_unavailable", "The database is unavailable", "Nothing was written; retry shortly."
)
S3_UNAVAILABLE = problem_body(
    "s3_unavailable",
    "Storage is unavailable",
    "The service's S3 credentials are not configured or failed their last check.",
)


async def post(http: aiohttp.ClientSession, url: str, name: str, **data: Any) -> tuple[int, Any]:
    async with http.post(f"{url}/api", json={"documentName": name, "data": data}) as response:
        if response.content_type == PROBLEM:
            return response.status, await response.json(content_type=PROBLEM)
        return response.status, await response.json()


async def metric(url: str, name: str) -> float:
    async with (
        aiohttp.ClientSession(headers=OPERATOR) as http,
        http.get(f"{url}/metrics") as response,
    ):
        for line in (await response.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


async def readyz(url: str) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession(headers=OPERATOR) as http,
        http.get(f"{url}/readyz") as response,
    ):
        return response.status, await response.json()


async def outbox_rows(env: dict[str, str]) -> dict[str, tuple[str, int]]:
    return {
        str(i): (str(s), int(a))  # type: ignore[call-overload]
        for i, s, a in await query(env, "SELECT id, status, attempts FROM outbox")
    }


async def consistent(env: dict[str, str]) -> set[str]:
    """Every event has its document and the other way round; the events' ids."""
    events = {str(r[0]) for r in await query(env, "SELECT id FROM outbox")}
    documents = {str(r[0]) for r in await query(env, "SELECT event_id FROM documents")}
    assert events == documents
    return events


# -- Inngest down --------------------------------------------------------------


async def test_inngest_down_far_past_the_retry_budget_fails_nothing(
    tmp_path: Path, service_env: dict[str, str], aiohttp_server
) -> None:
    """Nothing listens where Inngest should be for as long as 15 times what
    RETRY_MAX_ATTEMPTS would allow a row: the API keeps accepting, /readyz says
    degraded (still 200), and once Inngest is up everything goes, none failed."""
    port = free_port()
    env = {
        **service_env,
        **FAST_RETRIES,
        "INNGEST_BASE_URL": f"http://127.0.0.1:{port}",
        "LOG_LEVEL": "INFO",
    }
    service = await ServiceProcess(["serve"], env=env, cwd=tmp_path).started()
    try:
        acknowledged = []
        async with http_session() as http:
            await log_in(http, service.url)
            for i in range(5):
                status, body = await post(http, service.url, f"d{i}")
                assert status == 200
                acknowledged.append(body["id"])

            # The first send holds 5 rows, each probe after it one: 30 sends.
            async def probed_enough() -> bool:
                return await metric(service.url, "inngest_outbox_deferrals_total") >= 5 + 29

            await poll_until(probed_enough, wait_seconds=60)
            status, ready = await readyz(service.url)
            assert status == 200 and ready["status"] == "ok"
            assert ready["checks"]["worker"]["state"] == "degraded"
            assert ready["checks"]["worker"]["detail"].startswith(
                "Inngest unavailable: ClientConnectorError: Cannot connect to host 127.0.0.1"
            )
            rows = await outbox_rows(env)
            assert {rows[i] for i in acknowledged} == {("pending", 0)}
            assert await metric(service.url, "inngest_outbox_failures_total") == 0

            stand_in = StandIn(event_key=env["INNGEST_EVENT_KEY"])
            await aiohttp_server(stand_in.app(), port=port)  # Inngest is back
            async with asyncio.timeout(30):
                await stand_in.wait_until(lambda s: set(acknowledged) <= set(s.accepted_ids))

            async def worker_ok() -> bool:
                return (await readyz(service.url))[1]["checks"]["worker"]["state"] == "ok"

            await poll_until(worker_ok)
    finally:
        assert service.stop() == 0
    rows = await outbox_rows(env)
    assert {rows[i] for i in acknowledged} == {("delivered", 1)}  # the one that went
    log = service.log()
    assert "Inngest is unavailable" in log and "Inngest answers again" in log


# -- PostgreSQL down and back --------------------------------------------------


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A server of this test's own, to stop and start again."""
    try:
        # Durable: a crash must not take back what was acknowledged.
        server = start_postgres(durable=True)
    except PostgresUnavailable as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"PostgreSQL: {exc}")
    try:
        yield server
    finally:
        server.stop()


async def test_postgres_down_and_back(
    tmp_path: Path,
    service_env: dict[str, str],
    own_postgres: PostgresServer,
    inngest: StandIn,
) -> None:
    env = {
        **service_env,
        **FAST_RETRIES,
        "DATABASE_URL": own_postgres.create_database(),
        "INNGEST_BASE_URL": inngest.base_url,  # type: ignore[attr-defined]
        "INNGEST_EVENT_KEY": inngest.event_key,
        # Every request reads its session row, so reads meet the outage too.
        "SESSION_CHECK_SECONDS": "0",
    }
    await asyncio.to_thread(set_up_database, env["DATABASE_URL"], tmp_path)
    service = await ServiceProcess(["serve"], env=env, cwd=tmp_path).started()
    acknowledged: list[str] = []
    try:
        async with http_session() as http:
            await log_in(http, service.url)
            status, body = await post(http, service.url, "before")
            assert status == 200
            acknowledged.append(body["id"])

            await asyncio.to_thread(own_postgres.halt)
            for i in range(3):
                assert await post(http, service.url, f"down{i}") == (503, DATABASE_UNAVAILABLE)
            async with http.get(f"{service.url}/api/events/{acknowledged[0]}") as response:
                assert response.status == 503
                assert await response.json(content_type=PROBLEM) == {
                    **DATABASE_UNAVAILABLE,
                    "instance": f"/api/events/{acknowledged[0]}",
                }
            status, ready = await readyz(service.url)
            assert status == 503
            assert ready["checks"]["database"]["state"] == "unavailable"

            await asyncio.to_thread(own_postgres.resume)
            # The pool finds its connections dead and makes new ones: the
            # service recovers on its own, with no restart.
            answers: list[int] = []

            async def accepted_again() -> bool:
                status, body = await post(http, service.url, f"after{len(answers)}")
                answers.append(status)
                if status == 200:
                    acknowledged.append(body["id"])
                else:
                    assert (status, body) == (503, DATABASE_UNAVAILABLE)
                return status == 200

            await poll_until(accepted_again, wait_seconds=30, interval=0.1)
            for i in range(5):
                status, body = await post(http, service.url, f"later{i}")
                assert status == 200
                acknowledged.append(body["id"])
            async with asyncio.timeout(30):
                await inngest.wait_until(lambda s: set(acknowledged) <= set(s.accepted_ids))
            assert (await readyz(service.url))[0] == 200
    finally:
        assert service.stop() == 0
    # The refused requests wrote nothing; the accepted ones are all there.
    assert await consistent(env) == set(acknowledged)


async def test_postgres_crash_under_load_loses_nothing_and_answers_503(
    tmp_path: Path,
    service_env: dict[str, str],
    own_postgres: PostgresServer,
    inngest: StandIn,
) -> None:
    """The server crashes (``pg_ctl stop -m immediate``) under load and starts
    again, replaying its WAL: the API answers 503 database_unavailable while it
    is down or recovering, never 500 and never late; it and two worker processes
    recover by themselves, and every acknowledged event is delivered."""
    env = {
        **service_env,
        "DATABASE_URL": own_postgres.create_database(),
        "INNGEST_BASE_URL": inngest.base_url,  # type: ignore[attr-defined]
        "INNGEST_EVENT_KEY": inngest.event_key,
        "RETRY_BASE_SECONDS": "0.05",
        "RETRY_CAP_SECONDS": "0.5",
        "RETRY_MAX_ATTEMPTS": "1000",
        "WORKER_POLL_SECONDS": "0.2",
        "WORKER_LEASE_SECONDS": "5",
        "SESSION_CHECK_SECONDS": "0",  # every request reads the database
    }
    await asyncio.to_thread(set_up_database, env["DATABASE_URL"], tmp_path)
    worker_env = {**env, "LOG_LEVEL": "INFO"}  # to see them start
    workers = [ServiceProcess(["worker"], env=worker_env, cwd=tmp_path) for _ in range(2)]
    api = ServiceProcess(["serve", "--no-worker"], env=env, cwd=tmp_path)
    try:
        for worker in workers:
            await worker.logged("delivering to")
        await api.started()
    except BaseException:
        for process in (api, *workers):
            process.stop()
        raise
    # A request that outlives this timeout fails the test: no hang.
    timeout = aiohttp.ClientTimeout(total=15)
    answers: collections.Counter[tuple[str, int]] = collections.Counter()
    problems: list[tuple[str, int, str | None, Any]] = []
    acknowledged: list[str] = []
    progress = asyncio.Condition()
    stop = asyncio.Event()

    async def record(route: str, response: aiohttp.ClientResponse) -> None:
        answers[route, response.status] += 1
        if response.status != 200:
            body = await response.json(content_type=None)
            problems.append((route, response.status, response.headers.get("Retry-After"), body))
        async with progress:
            progress.notify_all()

    async def until(predicate: Callable[[], bool]) -> None:
        async with progress:
            await progress.wait_for(predicate)

    async def post_documents(client: int, logged_in: asyncio.Event) -> None:
        async with http_session(timeout=timeout) as http:
            await log_in(http, api.url)
            logged_in.set()
            n = 0
            while not stop.is_set() and len(acknowledged) < 20_000:
                body = {"documentName": f"c{client}-{n}"}
                async with http.post(f"{api.url}/api", json=body) as response:
                    if response.status == 200:
                        acknowledged.append((await response.json())["id"])
                    await record("/api", response)
                n += 1
                if response.status != 200:
                    await asyncio.sleep(0.02)  # a client pauses before it retries

    async def log_in_again_and_again() -> None:
        credentials = {"username": USER, "password": SERVICE_PASSWORD}
        while not stop.is_set():
            async with (
                http_session(timeout=timeout) as http,
                http.post(f"{api.url}/auth/login", json=credentials) as response,
            ):
                await record("/auth/login", response)
            await asyncio.sleep(0.05)  # the scenario: a client logging in again and again

    try:
        async with asyncio.timeout(150):
            clients = []
            for i in range(16):
                # One login at a time: concurrent attempts from one address
                # count against its limit while they are checked.
                logged_in = asyncio.Event()
                clients.append(asyncio.create_task(post_documents(i, logged_in)))
                await logged_in.wait()
            clients.append(asyncio.create_task(log_in_again_and_again()))
            await until(lambda: len(acknowledged) >= 300)
            await asyncio.to_thread(own_postgres.halt, "immediate")
            crashed_at = len(acknowledged)
            await until(lambda: answers["/api", 503] >= 50 and answers["/auth/login", 503] >= 2)
            own_postgres.start_again()  # the requests meet its recovery too
            await until(lambda: len(acknowledged) >= crashed_at + 300)
            stop.set()
            await asyncio.gather(*clients)
            await inngest.wait_until(lambda s: set(acknowledged) <= set(s.accepted_ids))

            async def all_delivered() -> bool:
                sql = "SELECT count(*) FROM outbox WHERE status <> 'delivered'"
                return await query(env, sql) == [(0,)]

            await poll_until(all_delivered)
        assert [w.process.poll() for w in workers] == [None, None]  # never restarted
    finally:
        stop.set()
        api_code = api.stop()
        for worker in workers:
            worker.stop()
    print(
        f"acknowledged {len(acknowledged)} ({crashed_at} before the crash), answers "
        f"{dict(answers)}, delivered {len(set(inngest.accepted_ids) & set(acknowledged))}, "
        f"duplicates {len(inngest.accepted_ids) - len(set(inngest.accepted_ids))}"
    )
    assert api_code == 0
    assert {status for _, status in answers} == {200, 503}
    for route, status, retry_after, body in problems:
        expected = {**DATABASE_UNAVAILABLE, "instance": route}
        assert (status, retry_after, body) == (503, "5", expected)
    assert set(acknowledged) <= await consistent(env)
    assert "unhandled error" not in api.log()


# -- the disk full -------------------------------------------------------------


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """A 16 MiB filesystem of its own (tmpfs): what fills it fills nothing else."""
    path = Path(tempfile.mkdtemp(prefix="small-disk-"))
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        shutil.rmtree(path)
        message = f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)
        shutil.rmtree(path)


def fill(disk: Path) -> Path:
    """Write until the filesystem has no byte left."""
    ballast = disk / "ballast"
    chunk = b"\0" * 65536
    with ballast.open("wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(chunk)
        with contextlib.suppress(OSError):
            while True:  # the last few bytes
                f.write(b"\0")
    return ballast


async def test_a_full_disk_is_503_and_the_service_recovers(
    small_disk: Path, service_env: dict[str, str], inngest: StandIn
) -> None:
    env = {
        **service_env,
        **FAST_RETRIES,
        "DATABASE_URL": f"sqlite+aiosqlite:///{small_disk / 'service.db'}",
        "INNGEST_BASE_URL": inngest.base_url,  # type: ignore[attr-defined]
        "INNGEST_EVENT_KEY": inngest.event_key,
    }
    await asyncio.to_thread(set_up_database, env["DATABASE_URL"], small_disk)
    # The log goes elsewhere: a full disk must not stop the test reading it.
    logs = Path(tempfile.mkdtemp(prefix="full-disk-logs-"))
    service = await ServiceProcess(["serve"], env=env, cwd=logs).started()
    acknowledged: list[str] = []
    try:
        async with http_session() as http:
            await log_in(http, service.url)
            assert (await post(http, service.url, "before"))[0] == 200
            ballast = fill(small_disk)
            # Documents larger than what the WAL has room for, until one fails.
            refused = 0
            for i in range(40):
                status, body = await post(http, service.url, f"full{i}", blob="x" * 200_000)
                if status == 200:
                    acknowledged.append(body["id"])
                    continue
                assert (status, body) == (503, DATABASE_UNAVAILABLE)
                refused += 1
                if refused == 3:
                    break
            assert refused == 3, "the disk never filled up"

            ballast.unlink()  # an operator frees space; nothing is restarted

            async def accepted_again() -> bool:
                status, body = await post(http, service.url, "after", blob="x" * 200_000)
                if status == 200:
                    acknowledged.append(body["id"])
                    return True
                assert (status, body) == (503, DATABASE_UNAVAILABLE)
                return False

            await poll_until(accepted_again, wait_seconds=30, interval=0.1)
            async with asyncio.timeout(30):
                await inngest.wait_until(lambda s: set(acknowledged) <= set(s.accepted_ids))
            assert (await readyz(service.url))[0] == 200
    finally:
        assert service.stop() == 0
    assert set(acknowledged) <= await consistent(env)
    assert "database or disk is full" in service.log()


# -- S3 credentials revoked ----------------------------------------------------


async def test_s3_credentials_revoked_while_running(
    tmp_path: Path, service_env: dict[str, str], moto_s3: MotoS3
) -> None:
    keys = moto_s3.create_user_keys(allowed=True)
    env = {
        **service_env,
        "AWS_ACCESS_KEY_ID": keys.access_key_id,
        "AWS_SECRET_ACCESS_KEY": keys.secret_access_key,
        "S3_CHECK_INTERVAL": "0.2",
    }
    service = await ServiceProcess(["serve", "--no-worker"], env=env, cwd=tmp_path).started()
    try:
        async with http_session() as http:
            await log_in(http, service.url)
            status, first = await post(http, service.url, "before")
            assert status == 200

            moto_s3.revoke(keys)

            async def refused() -> bool:
                return (await readyz(service.url))[1]["checks"]["s3"]["state"] == "forbidden"

            await poll_until(refused, wait_seconds=30)
            for i in range(3):
                assert await post(http, service.url, f"revoked{i}") == (503, S3_UNAVAILABLE)
            assert (await readyz(service.url))[0] == 503

            moto_s3.grant(keys)

            async def accepted_again() -> bool:
                return (await readyz(service.url))[1]["checks"]["s3"]["state"] == "ok"

            await poll_until(accepted_again, wait_seconds=30)
            status, after = await post(http, service.url, "after")
            assert status == 200
    finally:
        assert service.stop() == 0
    assert await consistent(env) == {first["id"], after["id"]}
    assert keys.secret_access_key not in service.log()


# -- SIGKILL, again and again --------------------------------------------------


async def kill_under_load(
    service: ServiceProcess, acknowledged: list[str], *, kill_after: int, delay: float, prefix: str
) -> bool:
    """POST from 16 connections; SIGKILL once ``kill_after`` ids are acknowledged
    and ``delay`` more seconds passed. Whether requests were still in flight."""
    enough = asyncio.Event()

    async def one(http: aiohttp.ClientSession, i: int) -> None:
        status, body = await post(http, service.url, f"{prefix}-{i}")
        if status == 200:
            acknowledged.append(body["id"])
            if len(acknowledged) >= kill_after:
                enough.set()

    async with http_session(connector=aiohttp.TCPConnector(limit=16)) as http:
        await log_in(http, service.url)
        posts = [asyncio.create_task(one(http, i)) for i in range(400)]
        async with asyncio.timeout(60):
            await enough.wait()
        await asyncio.sleep(delay)  # a moment no code chose
        service.kill()
        results = await asyncio.gather(*posts, return_exceptions=True)
    return any(isinstance(r, aiohttp.ClientError) for r in results)


async def test_repeated_sigkill_under_load_loses_nothing(
    tmp_path: Path, any_service_env: dict[str, str], inngest: StandIn
) -> None:
    """Kill the service at a random moment under load, four times over; restart it
    each time. In the end every acknowledged event is delivered."""
    env = {
        **any_service_env,
        **FAST_RETRIES,
        "INNGEST_BASE_URL": inngest.base_url,  # type: ignore[attr-defined]
        "INNGEST_EVENT_KEY": inngest.event_key,
    }
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    acknowledged: list[str] = []
    for round_ in range(4):
        service = await ServiceProcess(["serve"], env=env, cwd=tmp_path).started()
        killed_in_time = await kill_under_load(
            service, acknowledged, kill_after=len(acknowledged) + rng.randint(5, 60),
            delay=rng.uniform(0, 0.05), prefix=f"r{round_}",
        )  # fmt: skip
        assert killed_in_time, f"seed {seed}: the kill came after every request was answered"

    survivor = await ServiceProcess(["serve"], env=env, cwd=tmp_path).started()
    try:
        async with asyncio.timeout(60):
            await inngest.wait_until(lambda s: set(acknowledged) <= set(s.accepted_ids))
    finally:
        assert survivor.stop() == 0
    assert set(acknowledged) <= await consistent(env), f"seed {seed}"
    assert max(inngest.accepted_counts().values()) <= 1 + 4  # a re-send per kill at most
