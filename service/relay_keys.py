"""Relay keys: what Inngest SDKs send events to POST /e/{key} with.

An operator creates a key (`inngest-outbox keys add NAME`), which is shown once;
only its SHA-256 is stored. A key is 32 random bytes, so a fast hash is enough:
nobody can guess a key from its hash, and there is no password to stretch
against a dictionary. Keys are looked up by their hash, never compared with
the key sent: the time a lookup takes tells nothing about how much of a key
was right (a different key has an unrelated hash).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from .models import relay_keys
from .store.database import Database

# Names appear in lists, metrics labels and events' origin.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
KEY_BYTES = 32
# Past this many keys seen (mostly wrong ones), the cache starts afresh.
CACHE_LIMIT = 4096


class InvalidKeyName(ValueError):
    pass


class KeyExists(Exception):
    pass


class UnknownKey(Exception):
    pass


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def validate_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise InvalidKeyName(
            "a key's name is 1 to 64 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )
    return name


@dataclass(frozen=True, slots=True)
class KeyInfo:
    name: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


async def add_key(db: Database, name: str, *, now: datetime) -> str:
    """A new key for ``name``, returned once (only its hash is kept)."""
    validate_name(name)
    key = secrets.token_hex(KEY_BYTES)

    def insert(conn: sa.Connection) -> bool:
        taken = conn.execute(sa.select(relay_keys.c.id).where(relay_keys.c.name == name)).first()
        if taken is not None:
            return False
        conn.execute(relay_keys.insert().values(name=name, key_hash=hash_key(key), created_at=now))
        return True

    try:
        added = await db.write(insert)
    except sa.exc.IntegrityError:  # added meanwhile by another process
        added = False
    if not added:
        raise KeyExists(name)
    return key


async def list_keys(db: Database) -> list[KeyInfo]:
    columns = (
        relay_keys.c.name,
        relay_keys.c.created_at,
        relay_keys.c.last_used_at,
        relay_keys.c.revoked_at,
    )
    async with db.engine.connect() as conn:
        rows = await conn.execute(sa.select(*columns).order_by(relay_keys.c.name))
        return [KeyInfo(*row) for row in rows]


async def revoke_key(db: Database, name: str, *, now: datetime) -> bool:
    """Revoke ``name``'s key: False if it was revoked already. Every process
    refuses it within RELAY_KEY_CHECK_SECONDS."""

    def revoke(conn: sa.Connection) -> bool | None:
        row = conn.execute(
            sa.select(relay_keys.c.revoked_at).where(relay_keys.c.name == name)
        ).first()
        if row is None:
            return None
        if row.revoked_at is not None:
            return False
        conn.execute(relay_keys.update().where(relay_keys.c.name == name).values(revoked_at=now))
        return True

    revoked = await db.write(revoke)
    if revoked is None:
        raise UnknownKey(name)
    return revoked


_BY_HASH = sa.select(relay_keys.c.name).where(
    relay_keys.c.key_hash == sa.bindparam("key_hash"), relay_keys.c.revoked_at.is_(None)
)


class RelayKeys:
    """The keys this process accepts, each looked up at most once every
    ``check_seconds`` (a revocation elsewhere takes effect within that)."""

    def __init__(
        self,
        db: Database,
        *,
        check_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._db = db
        self._check_seconds = check_seconds
        self._clock = clock
        # key hash -> (name, or None for no such key; when looked up)
        self._seen: dict[str, tuple[str | None, float]] = {}
        # key hash -> its lookup under way, which every request for it awaits
        self._looking: dict[str, asyncio.Future[str | None]] = {}

    async def origin_of(self, key: str) -> str | None:
        """The name of the live key ``key``, or None (unknown or revoked)."""
        digest = hash_key(key)
        now = self._clock()
        seen = self._seen.get(digest)
        if seen is not None and now - seen[1] < self._check_seconds:
            return seen[0]
        # One lookup a key at a time: under load, the requests that arrive
        # while it runs wait for it instead of each queueing a lookup of their
        # own (hundreds of them, the relay's p99, every check_seconds).
        looking = self._looking.get(digest)
        if looking is None:
            looking = asyncio.ensure_future(self._look_up(digest, now))
            self._looking[digest] = looking
            looking.add_done_callback(lambda done: self._looked_up(digest, done))
        # Shielded: a request that gives up does not end the others' lookup.
        return await asyncio.shield(looking)

    async def _look_up(self, digest: str, now: float) -> str | None:
        async with self._db.engine.connect() as conn:
            name = (await conn.execute(_BY_HASH, {"key_hash": digest})).scalar()
        if len(self._seen) >= CACHE_LIMIT:
            self._seen.clear()
        self._seen[digest] = (name, now)
        return name

    def _looked_up(self, digest: str, done: asyncio.Future[str | None]) -> None:
        self._looking.pop(digest, None)
        if not done.cancelled():
            done.exception()  # retrieved: every request that waited has it
