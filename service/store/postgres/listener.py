"""PostgreSQL LISTEN/NOTIFY: a commit on one host wakes the workers on every host.

The intake sends ``NOTIFY inngest_outbox`` inside the transaction that writes
new rows (PostgreSQL delivers it at commit, and only then). Each worker keeps
one dedicated connection that LISTENs and sets its wake event. The poll stays
as the backstop; a dropped listener connection is re-established, and a
wake-up is given on reconnecting since notifications sent meanwhile are lost.
"""

from __future__ import annotations

import asyncio
import logging
import random

from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)

CHANNEL = "inngest_outbox"
NOTIFY_SQL = f"NOTIFY {CHANNEL}"
RECONNECT_MAX_SECONDS = 30.0


def asyncpg_dsn(sqlalchemy_url: str) -> str:
    return (
        make_url(sqlalchemy_url).set(drivername="postgresql").render_as_string(hide_password=False)
    )


class Listener:
    """Keeps a LISTEN connection open and turns notifications into wake-ups."""

    def __init__(self, sqlalchemy_url: str, wake: asyncio.Event) -> None:
        self._dsn = asyncpg_dsn(sqlalchemy_url)
        self._wake = wake
        self.connected = asyncio.Event()
        self.notifications = 0
        self.connections = 0

    async def run(self) -> None:
        import asyncpg  # the postgresql extra; SQLite users need not install it

        failures = 0
        while True:
            try:
                await self._listen_until_closed()
                failures = 0
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                failures += 1
                delay = random.uniform(0, min(RECONNECT_MAX_SECONDS, 0.1 * 2**failures))
                log.warning("LISTEN connection failed (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)

    async def _listen_until_closed(self) -> None:
        import asyncpg

        conn = await asyncpg.connect(self._dsn, timeout=10)
        closed = asyncio.Event()
        conn.add_termination_listener(lambda _conn: closed.set())
        try:
            await conn.add_listener(CHANNEL, self._notified)
            self.connections += 1
            self.connected.set()
            # Anything committed while we were not listening is due now.
            self._wake.set()
            while not closed.is_set():
                # asyncpg notices a dead server only when it uses the
                # connection: ask it something cheap now and then.
                try:
                    async with asyncio.timeout(5):
                        await closed.wait()
                except TimeoutError:
                    await conn.execute("SELECT 1", timeout=5)
        finally:
            self.connected.clear()
            if not conn.is_closed():
                conn.terminate()

    def _notified(self, *_args: object) -> None:
        self.notifications += 1
        self._wake.set()
