"""Retention: delivered rows are deleted once RETENTION_DAYS old, batch by batch."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from .. import outbox
from ..config import Settings
from ..store.database import Database

log = logging.getLogger(__name__)


class Retention:
    def __init__(
        self,
        db: Database,
        settings: Settings,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._db = db
        self._settings = settings
        self._clock = clock
        self.purged = 0

    async def run(self) -> None:
        """Every RETENTION_INTERVAL_SECONDS, delete what retention allows."""
        while True:
            try:
                await self.purge_once()
            except Exception:
                log.exception("retention failed; trying again at the next interval")
            await asyncio.sleep(self._settings.retention_interval_seconds)

    async def purge_once(self) -> int:
        """Delete, batch by batch, what retention allows now; how many rows.
        Only delivered rows: pending, sending and failed rows leave the outbox
        by delivery or by an operator's hand."""
        if self._settings.retention_days <= 0:
            return 0
        before = self._clock() - timedelta(days=self._settings.retention_days)
        total = 0
        while True:
            deleted = await outbox.purge_delivered(
                self._db, before=before, batch=self._settings.retention_batch
            )
            total += deleted
            self.purged += deleted
            if deleted < self._settings.retention_batch:
                return total
