"""The delivery worker and what runs beside it, wired in one place for `serve`
and `worker`: the Inngest client, retention, and the store's listener for
other processes' commits. The tasks are supervised: one that ends with an
error is logged and shown in the worker's health (so in /readyz), never lost;
all are stopped and awaited together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import aiohttp

from ..config import Settings
from ..metrics import Metrics
from ..store.database import Database
from .inngest import InngestClient
from .retention import Retention
from .worker import DeliveryWorker

log = logging.getLogger(__name__)


def inngest_session(settings: Settings) -> aiohttp.ClientSession:
    """One shared client session; per-request timeouts are the InngestClient's."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=max(settings.worker_max_in_flight * 2, 8)),
        timeout=aiohttp.ClientTimeout(total=settings.inngest_timeout_seconds),
    )


def inngest_client(settings: Settings, session: aiohttp.ClientSession) -> InngestClient:
    return InngestClient(
        session,
        base_url=settings.inngest_base_url,
        event_key=settings.inngest_event_key or "",
        env=settings.inngest_env,
        timeout_seconds=settings.inngest_timeout_seconds,
    )


class Supervised:
    """Background tasks started and stopped together; a crash is reported, not lost."""

    def __init__(self, on_crash: Callable[[str, BaseException], None]) -> None:
        self._tasks: list[asyncio.Task[None]] = []
        self._on_crash = on_crash
        # Set when any task ends by itself (a crash, or the worker stopping).
        self.ended = asyncio.Event()

    def start(self, name: str, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine, name=name)
        task.add_done_callback(self._finished)
        self._tasks.append(task)

    def _finished(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        self.ended.set()
        if (error := task.exception()) is not None:
            log.error("%s crashed", task.get_name(), exc_info=error)
            self._on_crash(task.get_name(), error)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


@contextlib.asynccontextmanager
async def delivering(
    db: Database, settings: Settings, *, wake: asyncio.Event, metrics: Metrics
) -> AsyncIterator[tuple[DeliveryWorker, Supervised]]:
    """A running worker, its retention and listener; at exit, the worker stops
    (in-flight sends finish within the grace period, the rest is released)."""
    async with inngest_session(settings) as session:
        worker = DeliveryWorker(
            db, inngest_client(settings, session), settings, wake=wake, metrics=metrics
        )
        tasks = Supervised(worker.crashed)
        tasks.start("delivery-worker", worker.run())
        tasks.start("outbox-retention", Retention(db, settings).run())
        if (listening := db.listen(wake)) is not None:
            tasks.start("outbox-listener", listening)
        try:
            yield worker, tasks
        finally:
            await worker.stop()
            await tasks.stop()
