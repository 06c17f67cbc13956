"""Users, password hashing and the session that says who is logged in."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import math
import os
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from aiohttp import hdrs, web
from aiohttp_session import Session
from aiohttp_session.cookie_storage import EncryptedCookieStorage
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy.exc import IntegrityError

from .config import Settings
from .models import login_failures, sessions, users
from .store.database import Database

MAX_CACHED_COOKIE_HEADER = 1024
USERNAME_RE = re.compile(r"[A-Za-z0-9._@-]{1,64}")
MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 1024


@dataclass(frozen=True, slots=True)
class User:
    id: int
    username: str
    is_admin: bool


# (session id, user): what a session cookie names.
Identity = tuple[str, User]


class UserExists(Exception):
    pass


class UnknownUser(Exception):
    pass


class InvalidUserInput(ValueError):
    pass


@functools.cache
def _hasher() -> PasswordHasher:
    return PasswordHasher()  # argon2id with the library's current defaults


@functools.cache
def _dummy_hash() -> str:
    # Verified against when the user does not exist, so that an unknown name
    # costs the same time as a wrong password: no user enumeration by timing.
    return _hasher().hash("not a password of anyone")


def validate_username(username: str) -> str:
    if not USERNAME_RE.fullmatch(username):
        raise InvalidUserInput(
            "a username is 1 to 64 characters of letters, digits, '.', '_', '@' and '-'"
        )
    return username


def validate_password(password: str) -> str:
    if not MIN_PASSWORD_LENGTH <= len(password) <= MAX_PASSWORD_LENGTH:
        raise InvalidUserInput(
            f"a password is {MIN_PASSWORD_LENGTH} to {MAX_PASSWORD_LENGTH} characters long"
        )
    return password


async def hash_password(password: str) -> str:
    return await asyncio.to_thread(_hasher().hash, password)


async def create_user(
    db: Database, username: str, password: str, *, is_admin: bool = False
) -> User:
    validate_username(username)
    validate_password(password)
    password_hash = await hash_password(password)
    statement = (
        users.insert()
        .values(
            username=username,
            password_hash=password_hash,
            is_admin=is_admin,
            created_at=datetime.now(UTC),
        )
        .returning(users.c.id)
    )
    try:
        user_id = await db.write(lambda conn: conn.execute(statement).scalar_one())
    except IntegrityError:
        raise UserExists(username) from None
    return User(id=user_id, username=username, is_admin=is_admin)


def _user_id(conn: Any, username: str) -> int:
    user_id = conn.scalar(sa.select(users.c.id).where(users.c.username == username))
    if user_id is None:
        raise UnknownUser(username)
    return int(user_id)


def _revoke_sessions(conn: Any, user_id: int, now: datetime) -> int:
    """Every open session of the user; each process refuses them from its next
    look at the row (within SESSION_CHECK_SECONDS)."""
    return conn.execute(
        sessions.update()
        .where(sessions.c.user_id == user_id, sessions.c.revoked_at.is_(None))
        .values(revoked_at=now)
    ).rowcount


async def revoke_sessions(db: Database, username: str) -> int:
    """Log the user out everywhere; how many sessions were open."""
    now = datetime.now(UTC)
    return await db.write(lambda conn: _revoke_sessions(conn, _user_id(conn, username), now))


async def set_password(db: Database, username: str, password: str) -> int:
    """A new password, and the user's sessions revoked (a password changed because
    one leaked must not leave a thief logged in); how many sessions were open."""
    validate_password(password)
    password_hash = await hash_password(password)
    now = datetime.now(UTC)

    def change(conn: Any) -> int:
        user_id = _user_id(conn, username)
        conn.execute(
            users.update().where(users.c.id == user_id).values(password_hash=password_hash)
        )
        return _revoke_sessions(conn, user_id, now)

    return await db.write(change)


async def set_disabled(db: Database, username: str, disabled: bool) -> int:
    """Disable (and revoke the sessions of) or enable a user; how many sessions
    were revoked."""
    now = datetime.now(UTC)

    def change(conn: Any) -> int:
        user_id = _user_id(conn, username)
        if not disabled:
            conn.execute(users.update().where(users.c.id == user_id).values(disabled_at=None))
            return 0
        conn.execute(
            users.update()
            .where(users.c.id == user_id, users.c.disabled_at.is_(None))
            .values(disabled_at=now)
        )
        return _revoke_sessions(conn, user_id, now)

    return await db.write(change)


class VerifierBusy(Exception):
    """Too many logins are waiting for a password check."""


class PasswordVerifier:
    """Checks passwords off the event loop, a few at a time.

    Each argon2 verification takes ~64 MiB and tens of milliseconds of CPU;
    unbounded, a burst of logins would take the memory of the machine and
    every thread of the default pool.
    """

    def __init__(self, *, concurrency: int | None = None, max_waiting: int = 64) -> None:
        self._slots = asyncio.Semaphore(concurrency or min(os.cpu_count() or 2, 8))
        self._max_waiting = max_waiting
        self._waiting = 0

    async def prepare(self) -> None:
        await asyncio.to_thread(_dummy_hash)

    async def verify(self, stored: str, password: str) -> bool:
        if self._waiting >= self._max_waiting:
            raise VerifierBusy()
        self._waiting += 1
        try:
            async with self._slots:
                return await asyncio.to_thread(_verify, stored, password)
        finally:
            self._waiting -= 1

    async def authenticate(self, db: Database, username: str, password: str) -> User | None:
        """The user if the password is right; None for a wrong password or unknown user alike."""
        async with db.engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(
                        users.c.id,
                        users.c.username,
                        users.c.password_hash,
                        users.c.is_admin,
                        users.c.disabled_at,
                    ).where(users.c.username == username)
                )
            ).first()
        stored = row.password_hash if row is not None else _dummy_hash()
        if not await self.verify(stored, password) or row is None or row.disabled_at is not None:
            return None  # a disabled user's right password fails as a wrong one: no hint
        if _hasher().check_needs_rehash(stored):
            rehash = (
                users.update()
                .where(users.c.id == row.id)
                .values(password_hash=await hash_password(password))
            )
            await db.write(lambda conn: conn.execute(rehash))
        return User(id=row.id, username=row.username, is_admin=row.is_admin)


def _verify(stored: str, password: str) -> bool:
    try:
        return _hasher().verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False


class CachedCookieStorage(EncryptedCookieStorage):
    """aiohttp-session's encrypted cookies, with decrypted cookies remembered.

    A client sends the same cookie on every request; decrypting and verifying
    it each time (Fernet, then JSON) was the largest cost of a POST /api. The
    cache maps a Cookie header, byte for byte, to what decrypting it gave, and
    is filled only by a successful decrypt, so it accepts exactly what the
    storage would accept, until the session's age passes max_age.

    A cookie that does not decrypt (forged, tampered with, of another key, or
    older than max_age) calls ``on_rejected`` (a metric) where aiohttp-session
    would log a warning: any client could otherwise write a log line a request.
    """

    def __init__(
        self,
        secret_key: bytes,
        *,
        cache_size: int = 10_000,
        on_rejected: Callable[[], None] = lambda: None,
        **kwargs: Any,
    ) -> None:
        super().__init__(secret_key, **kwargs)
        self._cookie_fernet = Fernet(base64.urlsafe_b64encode(secret_key))
        self._on_rejected = on_rejected
        # Cookie header -> (expires at, session data, the identity it names)
        self._cache: OrderedDict[str, tuple[float, dict[str, Any], Identity | None]] = OrderedDict()
        self._cache_size = cache_size

    async def identity(self, request: web.Request) -> Identity | None:
        """What ``session_of`` gives, from the cache without building a Session."""
        header = request.headers.get(hdrs.COOKIE)
        if header is not None and (hit := self._cache.get(header)) is not None:
            if time.time() < hit[0]:
                self._cache.move_to_end(header)
                return hit[2]
        return _identity(await self.load_session(request))

    async def load_session(self, request: web.Request) -> Session:
        header = request.headers.get(hdrs.COOKIE)
        if header is not None and (hit := self._cache.get(header)) is not None:
            expires_at, data, _ = hit
            if time.time() < expires_at:
                self._cache.move_to_end(header)
                return Session(None, data=data, new=False, max_age=self.max_age)
            del self._cache[header]
        session = self._decrypt(request)
        # Short headers only: a client must not fill the cache with 8 KiB keys
        # by varying another cookie.
        if header is not None and not session.new and len(header) <= MAX_CACHED_COOKIE_HEADER:
            expires_at = session.created + self.max_age if self.max_age else float("inf")
            self._cache[header] = (
                expires_at,
                {"created": session.created, "session": dict(session)},
                _identity(session),
            )
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return session

    def _decrypt(self, request: web.Request) -> Session:
        """EncryptedCookieStorage.load_session, counting what it would log."""
        cookie = self.load_cookie(request)
        if cookie is not None:
            try:
                plain = self._cookie_fernet.decrypt(cookie.encode("utf-8"), ttl=self.max_age)
                return Session(None, data=json.loads(plain), new=False, max_age=self.max_age)
            except InvalidToken:
                self._on_rejected()
        return Session(None, data=None, new=True, max_age=self.max_age)


def session_storage(
    settings: Settings, *, on_rejected: Callable[[], None] = lambda: None
) -> CachedCookieStorage:
    assert settings.session_secret is not None, "checked by Settings.check_production / dev"
    return CachedCookieStorage(
        settings.session_secret,
        on_rejected=on_rejected,
        cookie_name=settings.session_cookie_name,
        max_age=settings.session_max_age_seconds,
        httponly=True,
        samesite="Lax",
        secure=settings.session_cookie_secure or None,
        path="/",
    )


async def log_in(
    storage: EncryptedCookieStorage,
    request: web.Request,
    response: web.Response,
    user: User,
    session_id: str,
) -> None:
    # Always a new session: a cookie planted before login is not reused (fixation).
    session = Session(None, data=None, new=True, max_age=storage.max_age)
    session["sid"] = session_id
    session["uid"] = user.id
    session["name"] = user.username
    session["admin"] = user.is_admin
    await storage.save_session(request, response, session)


async def log_out(
    storage: EncryptedCookieStorage, request: web.Request, response: web.Response
) -> None:
    # An empty session: the storage deletes the cookie.
    await storage.save_session(request, response, Session(None, data={}, new=True))


async def session_of(storage: EncryptedCookieStorage, request: web.Request) -> Identity | None:
    """(session id, user) that the session cookie names, if it decrypts and is not
    too old; whether the session is still open is ``SessionRegistry.is_valid``'s."""
    if isinstance(storage, CachedCookieStorage):
        return await storage.identity(request)
    return _identity(await storage.load_session(request))


def _identity(session: Session) -> Identity | None:
    uid = session.get("uid")
    sid = session.get("sid")
    if not isinstance(uid, int) or not isinstance(sid, str) or session.new:
        return None
    return sid, User(id=uid, username=str(session.get("name")), is_admin=bool(session.get("admin")))


# A session in use has its last_seen_at written at most this often.
MAX_TOUCH_SECONDS = 60.0
# A verdict that never expires: this process saw the session's logout.
_REVOKED = (math.inf, False)


class SessionRegistry:
    """Server-side sessions: the cookie names a row, and logout revokes it.

    A process remembers each verdict for ``check_seconds`` so that a request
    costs no query; its own logouts take effect at once, another process's
    within ``check_seconds``. A session unused for ``idle_seconds`` is refused:
    the lookups of a session in use write when it was last seen.
    """

    def __init__(
        self, *, check_seconds: float, idle_seconds: float = 0, cache_size: int = 10_000
    ) -> None:
        self._check_seconds = check_seconds
        self._idle = timedelta(seconds=idle_seconds) if idle_seconds > 0 else None
        # How stale last_seen_at may get before a lookup writes it again: a
        # write per session a minute at most, an error on the idle time of as much.
        self._touch_after = timedelta(seconds=min(MAX_TOUCH_SECONDS, idle_seconds / 4))
        self._cache_size = cache_size
        self._verdicts: OrderedDict[str, tuple[float, bool]] = OrderedDict()
        self._lookups: dict[str, asyncio.Future[bool]] = {}

    async def open(self, db: Database, user_id: int, max_age_seconds: int) -> str:
        session_id = secrets.token_urlsafe(32)
        now = datetime.now(UTC)

        def insert(conn: Any) -> None:
            # Expired rows go as new ones come: the table holds live sessions.
            conn.execute(sessions.delete().where(sessions.c.expires_at < now))
            conn.execute(
                sessions.insert().values(
                    id=session_id,
                    user_id=user_id,
                    created_at=now,
                    expires_at=now + timedelta(seconds=max_age_seconds),
                    last_seen_at=now,
                )
            )

        await db.write(insert)
        return session_id

    async def is_valid(self, db: Database, session_id: str, user_id: int) -> bool:
        now = time.monotonic()
        hit = self._verdicts.get(session_id)
        if hit is not None and now < hit[0]:
            return hit[1]
        # One query per session however many of its requests missed at once:
        # a client's every connection misses in the same instant when its
        # verdict expires, and a query each was a pile-up on the read pool
        # (the service's p99). The query runs in a task of its own, so a
        # cancelled request does not fail the others waiting on it.
        lookup = self._lookups.get(session_id)
        if lookup is None:
            lookup = asyncio.ensure_future(self._look_up(db, session_id, user_id, now))
            self._lookups[session_id] = lookup
            lookup.add_done_callback(lambda _: self._lookups.pop(session_id, None))
        return await asyncio.shield(lookup)

    async def _look_up(self, db: Database, session_id: str, user_id: int, now: float) -> bool:
        row = await self._read_row(db, session_id)
        at = datetime.now(UTC)
        seen_at = None if row is None else row.last_seen_at or row.created_at
        valid = (
            row is not None
            and row.user_id == user_id
            and row.revoked_at is None
            and row.disabled_at is None
            and row.expires_at > at
            and (self._idle is None or seen_at > at - self._idle)
        )
        if self._verdicts.get(session_id) == _REVOKED:
            return False  # logged out here while the query ran (it may have read the row before)
        if valid and self._idle is not None and seen_at <= at - self._touch_after:
            touch = sessions.update().where(sessions.c.id == session_id).values(last_seen_at=at)
            await db.write(lambda conn: conn.execute(touch))
        self._remember(session_id, now + self._check_seconds, valid)
        return valid

    @staticmethod
    async def _read_row(db: Database, session_id: str) -> Any:
        async with db.engine.connect() as conn:
            columns = (
                sessions.c.user_id,
                sessions.c.created_at,
                sessions.c.expires_at,
                sessions.c.revoked_at,
                sessions.c.last_seen_at,
                users.c.disabled_at,
            )
            # The user's flag too: a login that passed its check as the user was
            # being disabled may open a session after the disable revoked the rest.
            query = (
                sa.select(*columns)
                .join_from(sessions, users, sessions.c.user_id == users.c.id)
                .where(sessions.c.id == session_id)
            )
            return (await conn.execute(query)).first()

    async def revoke(self, db: Database, session_id: str) -> None:
        statement = (
            sessions.update()
            .where(sessions.c.id == session_id, sessions.c.revoked_at.is_(None))
            .values(revoked_at=datetime.now(UTC))
        )
        await db.write(lambda conn: conn.execute(statement))
        self._remember(session_id, *_REVOKED)

    def _remember(self, session_id: str, until: float, valid: bool) -> None:
        self._verdicts[session_id] = (until, valid)
        self._verdicts.move_to_end(session_id)
        if len(self._verdicts) > self._cache_size:
            self._verdicts.popitem(last=False)


class TooManyLogins(Exception):
    def __init__(self, retry_after_seconds: int) -> None:
        super().__init__(retry_after_seconds)
        self.retry_after_seconds = retry_after_seconds


@dataclass(frozen=True, slots=True)
class LoginAttempt:
    """A login counted as failed from before its password is checked: its rows
    stay failures unless it succeeds (``LoginThrottle.succeeded``)."""

    pair_key: str
    row_ids: tuple[int, ...]
    # How long to wait before checking the password (the username's slowdown).
    delay_seconds: float


class LoginThrottle:
    """Failed logins counted in a sliding window, in the database (so across every
    process and host that shares it).

    Past ``max_failures`` for one username from one address, or from one address
    for any usernames, logins from there are refused (429): those keys belong to
    whoever sends the attempts. The username alone is never refused, since anyone
    can send its name: past ``max_failures`` each login for it first waits, twice
    as long for each further ``max_failures`` failures, up to ``slowdown_max_seconds``.

    An attempt is recorded before its password is checked, in the transaction
    that counts the earlier ones: concurrent attempts cannot all pass the count.
    """

    def __init__(
        self, *, max_failures: int, window_seconds: int, slowdown_max_seconds: float = 10.0
    ) -> None:
        self.max_failures = max_failures
        self.window = timedelta(seconds=window_seconds)
        self.slowdown_max_seconds = slowdown_max_seconds

    @staticmethod
    def keys(username: str, address: str) -> tuple[str, str, str]:
        """(the pair's, the address's, the username's) key."""
        name = username.lower()[:64]
        return f"pair:{name}|{address}"[:128], f"ip:{address}"[:128], f"user:{name}"

    def slowdown(self, failures: int) -> float:
        """Seconds a login for a username with this many recent failures waits."""
        steps = failures // self.max_failures
        if steps == 0:
            return 0.0
        return min(self.slowdown_max_seconds, 2.0 ** min(steps - 1, 62))

    async def begin(self, db: Database, username: str, address: str) -> LoginAttempt:
        """Count an attempt, or raise TooManyLogins if its address may try no more."""
        pair, by_address, by_name = self.keys(username, address)
        now = datetime.now(UTC)
        since = now - self.window

        def reserve(conn: Any) -> LoginAttempt | int:
            # The count and the insert are one step for concurrent attempts.
            db.serialize(conn, (pair, by_address))
            conn.execute(login_failures.delete().where(login_failures.c.at <= since))
            waits = [w for key in (pair, by_address) if (w := self._wait(conn, key, now))]
            if waits:
                return max(1, math.ceil(max(waits)))
            failures = conn.scalar(
                sa.select(sa.func.count())
                .select_from(login_failures)
                .where(login_failures.c.key == by_name, login_failures.c.at > since)
            )
            ids = conn.execute(
                login_failures.insert()
                .values([{"key": key, "at": now} for key in (pair, by_address, by_name)])
                .returning(login_failures.c.id)
            ).scalars()
            return LoginAttempt(pair, tuple(ids), self.slowdown(failures))

        outcome = await db.write(reserve)
        if isinstance(outcome, int):
            raise TooManyLogins(outcome)
        return outcome

    def _wait(self, conn: Any, key: str, now: datetime) -> float | None:
        """Seconds until ``key`` is under the limit again; None if it is now."""
        # The failure whose expiry brings the count back under the limit.
        unblocking = conn.scalar(
            sa.select(login_failures.c.at)
            .where(login_failures.c.key == key, login_failures.c.at > now - self.window)
            .order_by(login_failures.c.at.desc())
            .limit(1)
            .offset(self.max_failures - 1)
        )
        if unblocking is None:
            return None
        if unblocking.tzinfo is None:
            unblocking = unblocking.replace(tzinfo=UTC)
        return (unblocking + self.window - now).total_seconds()

    async def succeeded(self, db: Database, attempt: LoginAttempt) -> None:
        """The attempt was no failure, and neither were the earlier ones from the
        same address for the same name (a mistyped password)."""
        statement = login_failures.delete().where(
            login_failures.c.id.in_(attempt.row_ids) | (login_failures.c.key == attempt.pair_key)
        )
        await db.write(lambda conn: conn.execute(statement))

    async def abandon(self, db: Database, attempt: LoginAttempt) -> None:
        """The password was never checked: the attempt counts for nothing."""
        statement = login_failures.delete().where(login_failures.c.id.in_(attempt.row_ids))
        await db.write(lambda conn: conn.execute(statement))
