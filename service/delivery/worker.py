"""The delivery worker: claim due outbox rows, send them to Inngest, record the outcome.

Claim (commit), send (no transaction open), mark (a new short transaction,
fenced by the claim's lease token). A worker that dies anywhere in between
loses nothing: its rows come back when their lease expires and are sent again
with the same event id, which Inngest de-duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import secrets
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from .. import outbox
from ..config import Settings
from ..metrics import Metrics
from ..outbox import ClaimedEvent
from ..store.database import Database
from . import backoff
from .batches import linger_seconds, split_for_request
from .inngest import (
    Accepted,
    IngestFailed,
    InngestClient,
    KeyRejected,
    Outcome,
    Rejected,
    TooLarge,
    Transient,
    Unavailable,
)
from .status import WorkerHealth, WorkerStats

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
# The longest a bad event key pauses the worker before it tries again.
KEY_REJECTED_MAX_PAUSE_SECONDS = 60.0


def utc_now() -> datetime:
    return datetime.now(UTC)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


@dataclass(slots=True)
class _Lease:
    token: str
    unsent: dict[str, ClaimedEvent] = field(default_factory=dict)
    returned: bool = False  # some rows went back to pending


class DeliveryWorker:
    def __init__(
        self,
        db: Database,
        client: InngestClient,
        settings: Settings,
        *,
        wake: asyncio.Event | None = None,
        clock: Clock = utc_now,
        rng: random.Random | None = None,
        owner: str | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._db = db
        self._client = client
        self._settings = settings
        self._wake = wake or asyncio.Event()
        self._clock = clock
        self._rng = rng or random.Random()
        self.owner = owner or worker_id()
        self._metrics = metrics
        self.stats = WorkerStats()
        self._stopping = asyncio.Event()
        self._capacity = asyncio.Semaphore(settings.worker_max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._paused_until: datetime | None = None
        self._key_failures = 0
        self._outage_failures = 0  # sends in a row that found Inngest unavailable
        self._running = False
        self._run_exited = asyncio.Event()
        self._can_send = True
        self._health_detail = "no send yet"
        self._crashed: str | None = None
        self._progress = asyncio.Condition()
        # The hand-off (DocumentIntake.hand_off_to): rows this process's API
        # wrote already leased to this worker, by lease token, oldest first.
        self._offer: outbox.HandOff | None = None
        self._offers_out = 0  # offered, not yet accepted or declined
        self._offers_settled = asyncio.Event()
        self._offers_settled.set()
        self._handed: dict[str, tuple[outbox.HandOff, list[ClaimedEvent]]] = {}
        self._handed_ready = asyncio.Event()
        self._outbox_looked_at = -math.inf  # time.monotonic() of the last claim
        self._lease = timedelta(seconds=settings.worker_lease_seconds)

    # -- public -------------------------------------------------------------

    def wake(self) -> None:
        """Rows were committed: look now instead of at the next poll."""
        self._wake.set()

    # -- the hand-off (see DocumentIntake.hand_off_to) ------------------------

    def offer(self) -> outbox.HandOff | None:
        """A lease for the rows of a commit about to be made, or None when this
        worker would not send them soon (stopping, paused, Inngest unavailable,
        every send slot taken, enough waiting already): they are written
        pending, for whichever worker claims them."""
        if (
            not self._running
            or self._stopping.is_set()
            or self._is_paused()
            or self._outage_failures
            or self._capacity.locked()
            or sum(len(events) for _, events in self._handed.values())
            >= 2 * self._settings.worker_batch_size
        ):
            return None
        now = self._clock()
        if self._offer is None or self._offer.expires_at - now < self._lease * 0.75:
            self._offer = outbox.HandOff(self.owner, str(uuid.uuid4()), now + self._lease)
        self._offers_out += 1
        self._offers_settled.clear()
        return self._offer

    def accept(self, hand_off: outbox.HandOff, events: list[outbox.NewEvent]) -> None:
        self._settle_offer()
        if not events:
            return
        _, group = self._handed.setdefault(hand_off.token, (hand_off, []))
        group.extend(ClaimedEvent(e.id, e.payload, 0) for e in events)
        self._handed_ready.set()

    def decline(self, hand_off: outbox.HandOff) -> None:
        self._settle_offer()

    def _settle_offer(self) -> None:
        self._offers_out -= 1
        if self._offers_out == 0:
            self._offers_settled.set()

    def _take_handed(self) -> outbox.Claim | None:
        """The oldest group of handed-off rows whose lease is still good."""
        now = self._clock()
        while self._handed:
            token = next(iter(self._handed))
            hand_off, events = self._handed.pop(token)
            if self._offer is not None and self._offer.token == token:
                self._offer = None  # later commits get a lease of their own
            if hand_off.expires_at - now < self._lease / 2:
                # Waited out half its lease (an outage): sent now, the rows
                # could be claimed again mid-send. They are left to expire and
                # be claimed like any other expired lease.
                continue
            self.stats.claimed += len(events)
            self.stats.handed_off += len(events)
            return outbox.Claim(token, self.owner, events)
        self._handed_ready.clear()
        return None

    async def _release_handed(self) -> None:
        """At stop: what was handed off and not sent goes back to pending."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await self._offers_settled.wait()
        while self._handed:
            token, (_, events) = self._handed.popitem()
            await self._release(_Lease(token, {e.id: e for e in events}))

    @property
    def health(self) -> WorkerHealth:
        if self._crashed is not None:
            return WorkerHealth(False, self._can_send, self._crashed, self._outage_failures == 0)
        return WorkerHealth(
            self._running, self._can_send, self._health_detail, self._outage_failures == 0
        )

    def crashed(self, task: str, error: BaseException) -> None:
        """What runs beside it (running.Delivery's tasks) ended with ``error``."""
        self._crashed = f"{task} crashed: {type(error).__name__}"

    async def run(self) -> None:
        """Claim and deliver until ``stop()``."""
        self._running = True
        self._run_exited.clear()
        try:
            while not self._stopping.is_set():
                if not await self._pause_if_needed():
                    continue
                await self._capacity.acquire()
                if self._stopping.is_set():
                    self._capacity.release()
                    break
                try:
                    claim = await self._next_claim()
                except Exception:
                    self._capacity.release()
                    log.exception("claiming from the outbox failed; trying again shortly")
                    self._pause_for(self._settings.worker_poll_seconds)
                    continue
                if claim is None:
                    self._capacity.release()
                    await self._idle()
                    continue
                if self._outage_failures:
                    # Probing: one request at a time until Inngest answers again.
                    await self._deliver_claim(claim, release_capacity=True)
                    continue
                task = asyncio.create_task(self._deliver_claim(claim, release_capacity=True))
                self._tasks.add(task)
                task.add_done_callback(self._finished)
                if len(claim.events) < self._settings.worker_batch_size:
                    # A partial batch: rows are arriving, not waiting. Let a few
                    # milliseconds of them gather rather than send them one
                    # commit at a time; each send, claim and mark has its cost.
                    await self._linger(len(claim.events))
        finally:
            self._running = False
            self._run_exited.set()

    async def drain_once(self) -> WorkerStats:
        """Deliver everything due now, then return (burst mode: CLI and tests)."""
        while not self._is_paused() and (claim := await self._claim()):
            await self._deliver_claim(claim, release_capacity=False)
        return self.stats

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            # Marking failed (the database, say): the rows stay leased and come
            # back when the lease expires; Inngest de-duplicates the re-send.
            log.error("delivering a claim failed", exc_info=error)

    async def stop(self, grace_seconds: float | None = None) -> None:
        """Stop claiming; let in-flight sends finish within the grace period;
        release what was claimed but not sent."""
        grace = self._settings.shutdown_grace_seconds if grace_seconds is None else grace_seconds
        self._stopping.set()
        self._wake.set()
        loop = asyncio.get_running_loop()
        await self._wait_for_tasks(loop.time() + grace)
        if self._running:
            # run() sees the stop at its next step; a claim it was making
            # meanwhile goes to a delivery task that releases it unsent.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await self._run_exited.wait()
        await self._wait_for_tasks(loop.time() + 5)
        try:
            await self._release_handed()
        except Exception:
            # They come back when their lease expires.
            log.exception("releasing handed-off rows at stop failed")

    async def _wait_for_tasks(self, deadline: float) -> None:
        """Await every delivery task, those started meanwhile too; cancel the late."""
        loop = asyncio.get_running_loop()
        while self._tasks:
            pending = set(self._tasks)
            _, late = await asyncio.wait(pending, timeout=max(deadline - loop.time(), 0))
            if late:
                for task in late:
                    task.cancel()
                await asyncio.gather(*late, return_exceptions=True)

    async def wait_for(self, predicate: Callable[[WorkerStats], bool]) -> WorkerStats:
        """Wait until the stats satisfy ``predicate`` (for tests and benchmarks)."""
        async with self._progress:
            await self._progress.wait_for(lambda: predicate(self.stats))
        return self.stats

    # -- the loop -------------------------------------------------------------

    async def _next_claim(self) -> outbox.Claim | None:
        """Rows handed off by this process's API first, unless the outbox may
        hold due rows too: a wake-up (rows written pending, a retry, another
        host's commit), or no claim for a poll interval (expired leases, another
        process's writes on SQLite). While Inngest is unavailable: the probe."""
        now = time.monotonic()
        if (
            self._handed
            and not self._wake.is_set()
            and not self._outage_failures
            and now - self._outbox_looked_at < self._settings.worker_poll_seconds
        ):
            return self._take_handed()
        # Cleared before the claim: a commit that lands after it wakes us.
        self._wake.clear()
        self._outbox_looked_at = now
        claim = await self._claim()
        if claim is None and not self._outage_failures:
            claim = self._take_handed()
        return claim

    async def _claim(self) -> outbox.Claim | None:
        claim = await outbox.claim_batch(
            self._db,
            owner=self.owner,
            # While Inngest is unavailable, a probe is one event: the least to
            # hold back, and a batch too large to take in time cannot keep it down.
            limit=1 if self._outage_failures else self._settings.worker_batch_size,
            lease_seconds=self._settings.worker_lease_seconds,
            now=self._clock(),
        )
        if not claim.events:
            return None
        self.stats.claimed += len(claim.events)
        return claim

    async def _idle(self) -> None:
        """Sleep until woken, the next row is due, or the poll interval passes."""
        timeout = self._settings.worker_poll_seconds
        try:
            due = await outbox.next_due_at(self._db.engine)
        except Exception:
            log.exception("reading the outbox failed")
            due = None
        if due is not None:
            # Never a zero wait: a due row another worker is claiming right now
            # would otherwise spin this loop.
            timeout = min(timeout, max((due - self._clock()).total_seconds(), 0.005))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                if self._outage_failures:
                    # Handed-off rows wait for the outage's end: only a wake-up
                    # or the next probe's time ends this sleep.
                    await self._wake.wait()
                else:
                    await _first_of(self._wake, self._handed_ready)

    async def _linger(self, taken: int) -> None:
        """Let rows gather after a partial batch of ``taken`` rows: the whole
        WORKER_LINGER_SECONDS after LINGER_FULL_AT rows or more, proportionally
        less after fewer. Under load batches grow until the worker lingers in
        full; after an idle spell, a lone event waits for next to nothing."""
        seconds = linger_seconds(self._settings.worker_linger_seconds, taken)
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self._stopping.wait()

    async def _pause_if_needed(self) -> bool:
        """Wait out a pause (bad key, 429). False if stopped meanwhile."""
        if self._paused_until is None:
            return True
        remaining = (self._paused_until - self._clock()).total_seconds()
        if remaining > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._stopping.wait()
        self._paused_until = None
        return not self._stopping.is_set()

    async def _deliver_claim(self, claim: outbox.Claim, *, release_capacity: bool) -> None:
        lease = _Lease(claim.token, {e.id: e for e in claim.events})
        try:
            for chunk in split_for_request(
                claim.events,
                max_events=self._settings.inngest_max_batch_events,
                max_bytes=self._settings.inngest_max_request_bytes,
            ):
                if self._stopping.is_set() or self._is_paused():
                    break  # the rest is released below, not sent
                await self._send(lease, chunk)
        finally:
            try:
                if lease.unsent:
                    # Shielded: a cancel must not leave these rows leased for nothing.
                    await asyncio.shield(self._release(lease))
            finally:
                if release_capacity:
                    self._capacity.release()
                if lease.returned:
                    # Rows went back to pending (a retry, a release): let the
                    # loop work out when the next one is due. Delivered rows
                    # need no wake-up: a woken loop would only claim nothing.
                    self._wake.set()
                await self._notify()

    async def _release(
        self, lease: _Lease, held: tuple[int, str, Sequence[str]] | None = None
    ) -> None:
        """Give back what was claimed and not sent; ``held``: (status, error, ids)
        of a send refused for the key, recorded in those events' history."""
        lease.returned = True
        ids = list(lease.unsent)
        lease.unsent.clear()
        history = None
        if held is not None:
            status, error, refused = held
            history = (
                dict.fromkeys(refused),
                self._entry(outbox.HistoryKind.HELD, status, error),
            )
        released = await outbox.release(self._db, ids, lease.token, history=history)
        self.stats.released += released

    async def _send(self, lease: _Lease, events: Sequence[ClaimedEvent]) -> None:
        self.stats.requests += 1
        started = time.perf_counter()
        outcome = await self._client.send([e.payload for e in events])
        if self._metrics is not None:
            self._metrics.batch_events.observe(len(events))
            self._metrics.send_seconds.labels(type(outcome).__name__.lower()).observe(
                time.perf_counter() - started
            )
        # The send is done: what follows must be recorded even if we are
        # cancelled now, or a delivered row would be sent again for nothing.
        # A task of its own, so that stop() waits for it too.
        record = asyncio.ensure_future(self._record(lease, events, outcome))
        self._tasks.add(record)
        record.add_done_callback(self._finished)
        await asyncio.shield(record)

    async def _record(
        self, lease: _Lease, events: Sequence[ClaimedEvent], outcome: Outcome
    ) -> None:
        if not isinstance(outcome, Unavailable):
            self._inngest_answered()
        match outcome:
            case Accepted():
                await self._delivered(lease, events)
                self._send_succeeded()
            case Rejected(accepted=accepted, error=error):
                await self._delivered(lease, events[:accepted])
                await self._isolate(lease, events[accepted:], error, 400)
            case IngestFailed(accepted=accepted, error=error):
                # Inngest's own failure: the events wait and are sent again,
                # never bisected or failed for it.
                await self._delivered(lease, events[:accepted])
                await self._retry(lease, events[accepted:], error, 400, None)
            case TooLarge(error=error):
                await self._isolate(lease, events, error, 413)
            case KeyRejected(status=status, error=error):
                self._key_rejected(status, error)
                # Not the events' fault: give them back untouched.
                for event in events:
                    lease.unsent.setdefault(event.id, event)
                await self._release(lease, held=(status, error, [e.id for e in events]))
            case Unavailable(status=status, error=error, retry_after=retry_after):
                await self._defer(lease, events, error, status, retry_after)
            case Transient(status=status, error=error, retry_after=retry_after):
                await self._retry(lease, events, error, status, retry_after)

    async def _isolate(
        self, lease: _Lease, events: Sequence[ClaimedEvent], error: str, status: int
    ) -> None:
        """Find the event(s) Inngest refuses: one alone fails, more are bisected."""
        if not events:
            return
        if len(events) == 1:
            self._forget(lease, events)
            event = events[0]
            failed = await outbox.mark_failed(
                self._db,
                [event.id],
                lease.token,
                error=error,
                status_code=status,
                history=(
                    {event.id: event.attempts + 1},
                    self._entry(outbox.HistoryKind.FAILED, status, error),
                ),
            )
            self.stats.failed += failed
            self._count("failures", failed)
            self._count_lost(1 - failed)
            if failed:
                log.warning("event %s refused by Inngest: %s", events[0].id, error)
            return
        middle = len(events) // 2
        for half in (events[:middle], events[middle:]):
            await self._send(lease, half)

    async def _delivered(self, lease: _Lease, events: Sequence[ClaimedEvent]) -> None:
        if not events:
            return
        self._forget(lease, events)
        seen = {e.id: e.attempts + 1 for e in events if e.seen}
        marked = await outbox.mark_delivered(
            self._db,
            [e.id for e in events],
            lease.token,
            now=self._clock(),
            history=(seen, self._entry(outbox.HistoryKind.DELIVERED, 200, None)) if seen else None,
        )
        self.stats.delivered += marked
        self._count("deliveries", marked)
        self._count_lost(len(events) - marked)

    async def _defer(
        self,
        lease: _Lease,
        events: Sequence[ClaimedEvent],
        error: str,
        status: int | None,
        retry_after: float | None,
    ) -> None:
        """Inngest is unavailable: hold every send, and give the rows back to wait.

        An outage of hours must not turn accepted events into failed ones, so
        nothing counts an attempt here; instead the whole worker backs off, one
        probe per pause (exponential, with jitter, up to RETRY_CAP_SECONDS).
        """
        self._forget(lease, events)
        lease.returned = True
        if not self._is_paused():
            # Once per pause: the sends that were in flight when Inngest went
            # away fail together, and must not stretch the pause between them.
            self._outage_failures += 1
        if retry_after is not None:
            wait = retry_after  # Inngest said when (a 429's or 503's Retry-After)
        else:
            ceiling = min(
                self._settings.retry_cap_seconds,
                self._settings.retry_base_seconds * 2 ** min(self._outage_failures - 1, 62),
            )
            # Half fixed, half jitter: a pause near zero would make the probes a storm.
            wait = ceiling / 2 + self._rng.uniform(0, ceiling / 2)
        until = self._clock() + timedelta(seconds=wait)
        deferred = await outbox.defer(
            self._db,
            [e.id for e in events],
            lease.token,
            until=until,
            error=error,
            status_code=status,
            history=(
                {e.id: None for e in events},
                self._entry(outbox.HistoryKind.HELD, status, error),
            ),
        )
        self.stats.deferred += deferred
        self._count("deferrals", deferred)
        self._count_lost(len(events) - deferred)
        if self._outage_failures == 1:
            log.warning("Inngest is unavailable (%s); holding sends, events wait", error)
        self._health_detail = f"Inngest unavailable: {error}"
        self._pause_for(wait)

    async def _retry(
        self,
        lease: _Lease,
        events: Sequence[ClaimedEvent],
        error: str,
        status: int | None,
        retry_after: float | None,
    ) -> None:
        if not events:
            return
        self._forget(lease, events)
        lease.returned = True
        now = self._clock()

        def retry_at(attempt: int) -> datetime:
            wait = backoff.delay(
                attempt,
                base=self._settings.retry_base_seconds,
                cap=self._settings.retry_cap_seconds,
                rng=self._rng,
            )
            return now + timedelta(seconds=max(wait, retry_after or 0.0))

        rescheduled, failed = await outbox.schedule_retry(
            self._db,
            events,
            lease.token,
            retry_at=retry_at,
            max_attempts=self._settings.retry_max_attempts,
            error=error,
            status_code=status,
            actor=self.owner,
            now=now,
        )
        self.stats.retried += rescheduled
        self.stats.failed += failed
        self._count("retries", rescheduled)
        self._count("failures", failed)
        self._count_lost(len(events) - rescheduled - failed)
        log.warning(
            "send of %d events failed (%s); %d rescheduled, %d out of attempts",
            len(events),
            error,
            rescheduled,
            failed,
        )

    # -- bookkeeping ------------------------------------------------------------

    def _entry(
        self, kind: outbox.HistoryKind, status: int | None, error: str | None
    ) -> outbox.HistoryEntry:
        return outbox.HistoryEntry(kind, self.owner, self._clock(), status, error)

    def _forget(self, lease: _Lease, events: Sequence[ClaimedEvent]) -> None:
        for event in events:
            lease.unsent.pop(event.id, None)

    def _count(self, counter: str, amount: int) -> None:
        if self._metrics is not None and amount:
            getattr(self._metrics, counter).inc(amount)

    def _count_lost(self, lost: int) -> None:
        if lost > 0:
            # Our lease expired while the request was in flight and another
            # worker took the rows: its newer state stands.
            self.stats.lost_leases += lost
            log.warning("%d rows were no longer leased to %s; left as they are", lost, self.owner)

    def _inngest_answered(self) -> None:
        """Any answer but "unavailable" ends an outage, whatever it says of the events."""
        if self._outage_failures:
            log.info("Inngest answers again")
            self._outage_failures = 0
            if self._can_send:
                self._health_detail = "Inngest answers again"

    def _send_succeeded(self) -> None:
        if not self._can_send:
            log.info("Inngest accepts events again")
        self._key_failures = 0
        self._can_send = True
        self._health_detail = "last send accepted"

    def _key_rejected(self, status: int, error: str) -> None:
        self._key_failures += 1
        if self._can_send:
            # Once per outage, and never the key itself (it is in the URL).
            log.error(
                "Inngest refused the event key (HTTP %d): check INNGEST_EVENT_KEY and "
                "INNGEST_ENV; holding all sends until a send succeeds",
                status,
            )
        self._can_send = False
        self._health_detail = f"Inngest refused the event key (HTTP {status})"
        pause = min(
            KEY_REJECTED_MAX_PAUSE_SECONDS,
            max(self._settings.retry_base_seconds, 0.01) * 2 ** min(self._key_failures - 1, 16),
        )
        self._pause_for(pause)

    def _pause_for(self, seconds: float) -> None:
        until = self._clock() + timedelta(seconds=seconds)
        if self._paused_until is None or until > self._paused_until:
            self._paused_until = until

    def _is_paused(self) -> bool:
        return self._paused_until is not None and self._paused_until > self._clock()

    async def _notify(self) -> None:
        async with self._progress:
            self._progress.notify_all()


async def _first_of(*events: asyncio.Event) -> None:
    """Wait until any of the events is set."""
    if any(event.is_set() for event in events):
        return
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
