"""Login, logout, /auth/me and what the session cookie accepts."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from aiohttp.test_utils import TestClient
from argon2 import PasswordHasher
from cryptography.fernet import Fernet
from sqlalchemy.ext.asyncio import AsyncEngine

from service import auth
from service.app import create_app
from service.config import Settings
from service.models import login_failures, sessions, users
from service.store.database import Database
from tests.conftest import PASSWORD

PROBLEM = "application/problem+json"
COOKIE = "inngest_outbox_session"


async def login(client: TestClient, username: str = "alice", password: str = PASSWORD) -> Any:
    return await client.post("/auth/login", json={"username": username, "password": password})


def forge_cookie(secret: bytes, session: dict[str, Any], *, age_seconds: int = 0) -> str:
    fernet = Fernet(base64.urlsafe_b64encode(secret))
    created = int(time.time()) - age_seconds
    data = json.dumps({"created": created, "session": session}).encode()
    return fernet.encrypt_at_time(data, created).decode()


async def test_login_sets_a_hardened_cookie(client: TestClient, user: auth.User) -> None:
    response = await login(client)
    assert response.status == 200
    assert await response.json() == {"username": "alice", "admin": False, "expires_in": 604800}
    cookie = response.cookies[COOKIE]
    assert cookie["httponly"] is True
    assert cookie["samesite"] == "Lax"
    assert cookie["max-age"] == "604800"
    assert cookie["path"] == "/"
    assert not cookie["secure"]


async def test_cookie_is_secure_when_configured(
    aiohttp_client, settings: Settings, engine: AsyncEngine, user: auth.User
) -> None:
    client: TestClient = await aiohttp_client(
        create_app(settings.replace(session_cookie_secure=True, session_max_age_seconds=60))
    )
    response = await login(client)
    cookie = response.cookies[COOKIE]
    assert cookie["secure"] is True
    assert cookie["max-age"] == "60"


async def test_me_after_login(client: TestClient, user: auth.User) -> None:
    await login(client)
    response = await client.get("/auth/me")
    assert response.status == 200
    assert await response.json() == {"id": user.id, "username": "alice", "admin": False}


async def test_admin_flag_is_reported(
    client: TestClient, db: Database, engine: AsyncEngine
) -> None:
    await auth.create_user(db, "root", PASSWORD, is_admin=True)
    response = await login(client, "root")
    assert (await response.json())["admin"] is True


async def test_me_without_session_is_401(client: TestClient) -> None:
    response = await client.get("/auth/me")
    assert response.status == 401
    body = await response.json(content_type=PROBLEM)
    assert body["code"] == "unauthenticated"


async def test_wrong_password_and_unknown_user_get_the_same_401(
    client: TestClient, user: auth.User
) -> None:
    wrong = await login(client, "alice", "not the password")
    unknown = await login(client, "mallory", "not the password")
    assert wrong.status == unknown.status == 401
    wrong_body = await wrong.json(content_type=PROBLEM)
    unknown_body = await unknown.json(content_type=PROBLEM)
    assert (
        wrong_body
        == unknown_body
        == {
            "type": "https://inngest-outbox.dev/problems/invalid_credentials",
            "title": "Login failed",
            "status": 401,
            "code": "invalid_credentials",
            "detail": "The username or password is wrong.",
            "instance": "/auth/login",
        }
    )
    assert COOKIE not in wrong.cookies


async def test_unknown_user_still_costs_a_hash_verification(
    client: TestClient, user: auth.User, monkeypatch: pytest.MonkeyPatch
) -> None:
    verified: list[str] = []
    real_verify = auth._verify

    def counting_verify(stored: str, password: str) -> bool:
        verified.append(stored)
        return real_verify(stored, password)

    monkeypatch.setattr(auth, "_verify", counting_verify)
    await login(client, "mallory", "whatever-password")
    await login(client, "alice", "whatever-password")
    assert len(verified) == 2
    assert all(h.startswith("$argon2id$") for h in verified)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"password": PASSWORD}, "username"),
        ({"username": "alice"}, "password"),
        ({"username": 1, "password": PASSWORD}, "username"),
        ({"username": "alice", "password": ""}, "password"),
    ],
)
async def test_login_body_errors_are_400(
    client: TestClient, user: auth.User, payload: dict[str, Any], field: str
) -> None:
    response = await client.post("/auth/login", json=payload)
    assert response.status == 400
    body = await response.json(content_type=PROBLEM)
    assert body["code"] == "invalid_field"
    assert body["field"] == field
    assert body["rule"] == "required"


async def test_login_needs_json(client: TestClient) -> None:
    response = await client.post("/auth/login", data="username=alice&password=x")
    assert response.status == 415
    assert (await response.json(content_type=PROBLEM))["code"] == "unsupported_media_type"


async def test_logout_clears_the_session(client: TestClient, user: auth.User) -> None:
    await login(client)
    response = await client.post("/auth/logout", json={})
    assert response.status == 204
    assert response.cookies[COOKIE].value == ""
    assert (await client.get("/auth/me")).status == 401
    assert (await client.post("/api", json={"documentName": "a"})).status == 401


@pytest.mark.parametrize(
    ("request_args", "status", "code"),
    [
        ({}, 415, "unsupported_media_type"),
        (
            {"data": "logout", "headers": {"Content-Type": "text/plain"}},
            415,
            "unsupported_media_type",
        ),
        ({"data": "", "headers": {"Content-Type": "application/json"}}, 400, "malformed_json"),
        ({"json": []}, 400, "invalid_body"),
        ({"json": {}, "headers": {"Origin": "https://evil.example"}}, 403, "origin_not_allowed"),
        ({"json": {"x": "y" * 2000}}, 413, "payload_too_large"),
    ],
)
async def test_logout_follows_the_rules_of_every_state_changing_route(
    client: TestClient, user: auth.User, request_args: dict[str, Any], status: int, code: str
) -> None:
    await login(client)
    response = await client.post("/auth/logout", **request_args)
    assert response.status == status
    assert (await response.json(content_type=PROBLEM))["code"] == code
    assert "set-cookie" not in response.headers
    assert (await client.get("/auth/me")).status == 200  # still logged in


async def test_login_replaces_a_planted_session(
    client: TestClient, user: auth.User, settings: Settings, engine: AsyncEngine
) -> None:
    assert settings.session_secret is not None
    planted = forge_cookie(settings.session_secret, {"planted": True})
    client.session.cookie_jar.update_cookies({COOKIE: planted})
    response = await login(client)
    assert response.cookies[COOKIE].value != planted


class TestCookiesThatAreNotAccepted:
    async def test_garbage(self, client: TestClient) -> None:
        client.session.cookie_jar.update_cookies({COOKIE: "not-a-fernet-token"})
        assert (await client.get("/auth/me")).status == 401

    async def test_tampered(self, client: TestClient, user: auth.User) -> None:
        response = await login(client)
        value = response.cookies[COOKIE].value
        middle = len(value) // 2
        flipped = value[:middle] + ("A" if value[middle] != "A" else "B") + value[middle + 1 :]
        client.session.cookie_jar.clear()
        client.session.cookie_jar.update_cookies({COOKIE: flipped})
        assert (await client.get("/auth/me")).status == 401

    async def test_signed_with_another_secret(self, client: TestClient, user: auth.User) -> None:
        other = forge_cookie(b"\x01" * 32, {"uid": user.id, "name": "alice", "admin": True})
        client.session.cookie_jar.update_cookies({COOKIE: other})
        assert (await client.get("/auth/me")).status == 401
        assert (await client.post("/api", json={"documentName": "a"})).status == 401

    async def test_expired(
        self, client: TestClient, user: auth.User, settings: Settings, db: Database
    ) -> None:
        assert settings.session_secret is not None
        sid = await auth.SessionRegistry(check_seconds=0).open(db, user.id, 3600)
        session = {"sid": sid, "uid": user.id, "name": "alice", "admin": False}
        fresh = forge_cookie(settings.session_secret, session, age_seconds=10)
        client.session.cookie_jar.update_cookies({COOKIE: fresh})
        assert (await client.get("/auth/me")).status == 200  # the forging is right...
        stale = forge_cookie(
            settings.session_secret, session, age_seconds=settings.session_max_age_seconds + 5
        )
        client.session.cookie_jar.update_cookies({COOKIE: stale})
        assert (await client.get("/auth/me")).status == 401  # ...and age alone refuses it


async def test_cookies_that_do_not_decrypt_are_counted_not_logged(
    client: TestClient, user: auth.User, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.support.service import OPERATOR
    from tests.test_admin import metric

    rejected = "inngest_outbox_session_cookies_rejected_total"
    caplog.set_level(logging.DEBUG)
    for value in ("not-a-fernet-token", forge_cookie(b"\x01" * 32, {"uid": user.id}), "é"):
        client.session.cookie_jar.update_cookies({COOKIE: value})
        assert (await client.get("/auth/me")).status == 401
        assert (await client.post("/api", json={"documentName": "a"})).status == 401
    text = await (await client.get("/metrics", headers=OPERATOR)).text()
    assert metric(text, rejected) == 6
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert not any("decrypt" in r.getMessage() for r in caplog.records)


@pytest.mark.real_password_hashing
async def test_outdated_hash_is_upgraded_on_login(
    client: TestClient, engine: AsyncEngine, user: auth.User
) -> None:
    weak = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash(PASSWORD)
    async with engine.begin() as conn:
        await conn.execute(users.update().values(password_hash=weak))
    assert (await login(client)).status == 200
    async with engine.connect() as conn:
        stored = await conn.scalar(sa.select(users.c.password_hash))
    assert stored != weak
    assert not PasswordHasher().check_needs_rehash(stored)


@pytest.mark.real_password_hashing
async def test_passwords_are_stored_as_argon2id(engine: AsyncEngine, user: auth.User) -> None:
    async with engine.connect() as conn:
        stored = await conn.scalar(sa.select(users.c.password_hash))
    assert stored.startswith("$argon2id$")
    assert PASSWORD not in stored


async def test_duplicate_user_is_refused(
    db: Database, engine: AsyncEngine, user: auth.User
) -> None:
    with pytest.raises(auth.UserExists):
        await auth.create_user(db, "alice", PASSWORD)


@pytest.mark.parametrize("name", ["", "has space", "x" * 65, "semi;colon"])
async def test_bad_usernames_are_refused(db: Database, engine: AsyncEngine, name: str) -> None:
    with pytest.raises(auth.InvalidUserInput):
        await auth.create_user(db, name, PASSWORD)


async def test_short_password_is_refused(db: Database, engine: AsyncEngine) -> None:
    with pytest.raises(auth.InvalidUserInput):
        await auth.create_user(db, "bob", "short")


async def test_login_is_503_when_too_many_password_checks_wait(
    aiohttp_client, settings: Settings, engine: AsyncEngine, user: auth.User
) -> None:
    from service.keys import PASSWORDS

    app = create_app(settings)
    app[PASSWORDS] = auth.PasswordVerifier(concurrency=1, max_waiting=0)
    client: TestClient = await aiohttp_client(app)
    response = await login(client)
    assert response.status == 503
    assert response.headers["Retry-After"] == "1"
    body = await response.json(content_type=PROBLEM)
    assert body["code"] == "login_busy"


@pytest.mark.real_password_hashing
async def test_password_checks_run_a_few_at_a_time(user: auth.User) -> None:
    import asyncio

    verifier = auth.PasswordVerifier(concurrency=2, max_waiting=100)
    running = peak = 0
    real_verify = auth._verify

    def tracking_verify(stored: str, password: str) -> bool:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            return real_verify(stored, password)
        finally:
            running -= 1

    auth_verify = auth._verify
    auth._verify = tracking_verify  # type: ignore[assignment]
    try:
        stored = await auth.hash_password(PASSWORD)
        results = await asyncio.gather(*(verifier.verify(stored, PASSWORD) for _ in range(6)))
    finally:
        auth._verify = auth_verify  # type: ignore[assignment]
    assert results == [True] * 6
    assert peak == 2


# -- server-side sessions ------------------------------------------------------


async def test_a_cookie_copied_before_logout_is_refused_after_it(
    aiohttp_client, client: TestClient, user: auth.User, settings: Settings, engine: AsyncEngine
) -> None:
    response = await login(client)
    copied = response.cookies[COOKIE].value
    assert (await client.post("/auth/logout", json={})).status == 204
    replay = client  # the same server, the cookie put back as an attacker would
    replay.session.cookie_jar.update_cookies({COOKIE: copied})
    assert (await replay.get("/auth/me")).status == 401
    response = await replay.post("/api", json={"documentName": "a"})
    assert response.status == 401
    assert (await response.json(content_type=PROBLEM))["code"] == "unauthenticated"
    async with engine.connect() as conn:
        assert await conn.scalar(sa.text("SELECT count(*) FROM documents")) == 0


async def test_a_logout_on_one_process_reaches_the_others(
    aiohttp_client, user: auth.User, settings: Settings
) -> None:
    """Two apps on one database stand for two processes; with SESSION_CHECK_SECONDS
    0 each request looks at the session row (the default, 5, bounds the delay)."""
    first = await aiohttp_client(create_app(settings.replace(session_check_seconds=0)))
    second = await aiohttp_client(create_app(settings.replace(session_check_seconds=0)))
    cookie = (await login(first)).cookies[COOKIE].value
    second.session.cookie_jar.update_cookies({COOKIE: cookie})
    assert (await second.get("/auth/me")).status == 200
    assert (await first.post("/auth/logout", json={})).status == 204
    assert (await second.get("/auth/me")).status == 401


async def set_last_seen(engine: AsyncEngine, ago: timedelta) -> None:
    async with engine.begin() as conn:
        await conn.execute(sessions.update().values(last_seen_at=datetime.now(UTC) - ago))


async def last_seen_ago(engine: AsyncEngine) -> timedelta:
    async with engine.connect() as conn:
        return datetime.now(UTC) - await conn.scalar(sa.select(sessions.c.last_seen_at))


async def test_a_session_unused_past_the_idle_timeout_is_refused(
    alice_on, engine: AsyncEngine
) -> None:
    client = await alice_on(session_check_seconds=0, session_idle_seconds=3600)
    await set_last_seen(engine, timedelta(minutes=59))
    assert (await client.get("/auth/me")).status == 200
    await set_last_seen(engine, timedelta(minutes=61))
    assert (await client.get("/auth/me")).status == 401
    response = await client.post("/api", json={"documentName": "a"})
    assert (await response.json(content_type=PROBLEM))["code"] == "unauthenticated"


async def test_a_session_in_use_is_kept_alive(alice_on, engine: AsyncEngine) -> None:
    client = await alice_on(session_check_seconds=0, session_idle_seconds=3600)
    await set_last_seen(engine, timedelta(minutes=50))
    assert (await client.get("/auth/me")).status == 200
    assert await last_seen_ago(engine) < timedelta(seconds=10)  # written again
    await set_last_seen(engine, timedelta(seconds=30))
    assert (await client.get("/auth/me")).status == 200
    assert await last_seen_ago(engine) >= timedelta(seconds=30)  # recent enough: no write


async def test_without_an_idle_timeout_only_the_absolute_age_counts(
    alice_on, engine: AsyncEngine
) -> None:
    client = await alice_on(session_check_seconds=0, session_idle_seconds=0)
    await set_last_seen(engine, timedelta(days=6))
    assert (await client.get("/auth/me")).status == 200


def count_session_reads(db: Database) -> list[str]:
    """Every statement that reads the sessions table, as the engine runs it."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "FROM sessions" in statement:
            seen.append(statement)

    sa.event.listen(db.engine.sync_engine, "before_cursor_execute", record)
    return seen


async def test_requests_that_miss_at_once_share_one_session_query(
    db: Database, user: auth.User
) -> None:
    """When a verdict expires, every connection of the client misses together."""
    registry = auth.SessionRegistry(check_seconds=60)
    sid = await registry.open(db, user.id, 3600)
    reads = count_session_reads(db)
    verdicts = await asyncio.gather(*(registry.is_valid(db, sid, user.id) for _ in range(50)))
    assert verdicts == [True] * 50
    assert len(reads) == 1
    assert await registry.is_valid(db, sid, user.id) is True
    assert len(reads) == 1  # and the verdict is remembered


async def test_a_cancelled_request_does_not_fail_the_shared_session_query(
    db: Database, user: auth.User, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = auth.SessionRegistry(check_seconds=60)
    sid = await registry.open(db, user.id, 3600)
    reading, go_on = asyncio.Event(), asyncio.Event()
    reads = []
    read_row = registry._read_row

    async def held_read(*args: Any) -> Any:
        reads.append(args)
        reading.set()
        await go_on.wait()
        return await read_row(*args)

    monkeypatch.setattr(registry, "_read_row", held_read)
    first = asyncio.ensure_future(registry.is_valid(db, sid, user.id))
    second = asyncio.ensure_future(registry.is_valid(db, sid, user.id))
    await reading.wait()  # the query runs; both requests wait on it
    first.cancel()  # while the query runs
    go_on.set()
    assert await second is True
    with pytest.raises(asyncio.CancelledError):
        await first
    assert len(reads) == 1  # one query, shared


async def test_a_logout_during_a_session_query_wins(
    db: Database, user: auth.User, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The query reads the row before the logout writes it, and answers after:
    the logout's verdict stands, and is not replaced by the query's."""
    registry = auth.SessionRegistry(check_seconds=60)
    sid = await registry.open(db, user.id, 3600)
    row_read, logged_out = asyncio.Event(), asyncio.Event()
    read_row = registry._read_row

    async def slow_read(*args: Any) -> Any:
        row = await read_row(*args)
        row_read.set()
        await logged_out.wait()
        return row

    monkeypatch.setattr(registry, "_read_row", slow_read)
    lookup = asyncio.ensure_future(registry.is_valid(db, sid, user.id))
    await row_read.wait()
    await registry.revoke(db, sid)
    logged_out.set()
    assert await lookup is False
    assert await registry.is_valid(db, sid, user.id) is False


async def test_a_cookie_without_a_session_row_is_refused(
    client: TestClient, user: auth.User, settings: Settings
) -> None:
    """The right key, but no session the server opened (an older cookie, a made-up id)."""
    assert settings.session_secret is not None
    for session in (
        {"uid": user.id, "name": "alice", "admin": True},
        {"sid": "made-up", "uid": user.id, "name": "alice", "admin": True},
    ):
        client.session.cookie_jar.update_cookies(
            {COOKIE: forge_cookie(settings.session_secret, session)}
        )
        assert (await client.get("/auth/me")).status == 401


async def test_a_disabled_users_sessions_are_refused(db: Database, user: auth.User) -> None:
    """Even one opened after the disable (a login that passed its check meanwhile)."""
    registry = auth.SessionRegistry(check_seconds=0)
    before = await registry.open(db, user.id, 3600)
    assert await auth.set_disabled(db, "alice", True) == 1
    after = await registry.open(db, user.id, 3600)
    assert await registry.is_valid(db, before, user.id) is False
    assert await registry.is_valid(db, after, user.id) is False
    assert await auth.set_disabled(db, "alice", False) == 0
    assert await registry.is_valid(db, after, user.id) is True  # never revoked
    assert await registry.is_valid(db, before, user.id) is False  # revoked for good


async def test_a_disabled_user_cannot_log_in(
    client: TestClient, db: Database, user: auth.User
) -> None:
    await auth.set_disabled(db, "alice", True)
    response = await login(client)
    assert response.status == 401
    assert (await response.json(content_type=PROBLEM))["code"] == "invalid_credentials"


async def test_a_session_names_its_own_user_only(
    client: TestClient, user: auth.User, settings: Settings, db: Database
) -> None:
    bob = await auth.create_user(db, "bob", PASSWORD)
    sid = await auth.SessionRegistry(check_seconds=0).open(db, bob.id, 3600)
    assert settings.session_secret is not None
    forged = forge_cookie(settings.session_secret, {"sid": sid, "uid": user.id, "name": "alice"})
    client.session.cookie_jar.update_cookies({COOKIE: forged})
    assert (await client.get("/auth/me")).status == 401


# -- brute force ----------------------------------------------------------------


async def test_too_many_failed_logins_from_one_address_are_429(
    aiohttp_client, user: auth.User, settings: Settings
) -> None:
    client = await aiohttp_client(create_app(settings.replace(login_max_failures=3)))
    for name in ("alice", "bob", "carol"):  # any names, one address
        assert (await login(client, name, "wrong password")).status == 401
    response = await login(client)  # the right password, too late
    assert response.status == 429
    body = await response.json(content_type=PROBLEM)
    retry_after = int(response.headers["Retry-After"])
    assert 895 <= retry_after <= 900
    assert body == {
        "type": "https://inngest-outbox.dev/problems/too_many_logins",
        "title": "Too many failed logins",
        "status": 429,
        "code": "too_many_logins",
        "detail": f"Too many failed logins from this address; retry in {retry_after} seconds.",
        "instance": "/auth/login",
    }
    assert "set-cookie" not in response.headers


async def test_concurrent_attempts_are_counted_before_their_passwords_are_checked(
    db: Database, engine: AsyncEngine
) -> None:
    throttle = auth.LoginThrottle(max_failures=10, window_seconds=900)
    outcomes = await asyncio.gather(
        *(throttle.begin(db, "alice", "10.0.0.1") for _ in range(40)), return_exceptions=True
    )
    assert sum(isinstance(o, auth.LoginAttempt) for o in outcomes) == 10
    assert sum(isinstance(o, auth.TooManyLogins) for o in outcomes) == 30


async def test_the_pair_and_the_address_are_limited_and_the_name_only_slowed(
    db: Database, engine: AsyncEngine
) -> None:
    throttle = auth.LoginThrottle(max_failures=2, window_seconds=900, slowdown_max_seconds=3)
    for _ in range(2):
        assert (await throttle.begin(db, "alice", "10.0.0.1")).delay_seconds == 0
    with pytest.raises(auth.TooManyLogins) as caught:
        await throttle.begin(db, "alice", "10.0.0.1")  # the pair
    assert 899 <= caught.value.retry_after_seconds <= 900
    with pytest.raises(auth.TooManyLogins):
        await throttle.begin(db, "bob", "10.0.0.1")  # the address, whatever the name
    # The name from elsewhere: never refused, only slowed, more as failures grow.
    delays = [(await throttle.begin(db, "Alice", f"10.0.1.{i}")).delay_seconds for i in range(8)]
    assert delays == [1, 1, 2, 2, 3, 3, 3, 3]
    assert (await throttle.begin(db, "bob", "10.0.0.2")).delay_seconds == 0


def test_the_slowdown_doubles_every_limit_up_to_its_cap() -> None:
    throttle = auth.LoginThrottle(max_failures=10, window_seconds=900, slowdown_max_seconds=10)
    assert [throttle.slowdown(n) for n in (0, 9, 10, 19, 20, 30, 40, 50, 10**6)] == [
        0, 0, 1, 1, 2, 4, 8, 10, 10,
    ]  # fmt: skip


async def test_a_success_forgives_the_pair_only(db: Database, engine: AsyncEngine) -> None:
    """A mistyped password is forgiven by the right one from the same address; the
    address and the name keep counting it."""
    throttle = auth.LoginThrottle(max_failures=2, window_seconds=900)
    await throttle.begin(db, "alice", "10.0.0.1")
    await throttle.succeeded(db, await throttle.begin(db, "alice", "10.0.0.1"))
    async with engine.connect() as conn:
        keys = (await conn.scalars(sa.select(login_failures.c.key).order_by("key"))).all()
    assert keys == ["ip:10.0.0.1", "user:alice"]


async def test_an_abandoned_attempt_counts_for_nothing(db: Database, engine: AsyncEngine) -> None:
    throttle = auth.LoginThrottle(max_failures=1, window_seconds=900)
    await throttle.abandon(db, await throttle.begin(db, "alice", "10.0.0.1"))
    await throttle.begin(db, "alice", "10.0.0.1")
    with pytest.raises(auth.TooManyLogins):
        await throttle.begin(db, "alice", "10.0.0.1")


async def test_failures_older_than_the_window_no_longer_count(
    db: Database, engine: AsyncEngine
) -> None:
    throttle = auth.LoginThrottle(max_failures=1, window_seconds=900)
    await throttle.begin(db, "alice", "10.0.0.1")
    with pytest.raises(auth.TooManyLogins):
        await throttle.begin(db, "alice", "10.0.0.1")
    async with engine.begin() as conn:
        an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
        await conn.execute(sa.update(login_failures).values(at=an_hour_ago))
    attempt = await throttle.begin(db, "alice", "10.0.0.1")
    assert attempt.delay_seconds == 0
