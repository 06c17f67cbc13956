"""What a delivery worker reports: its counters and its health."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class WorkerStats:
    claimed: int = 0
    delivered: int = 0
    retried: int = 0
    failed: int = 0
    released: int = 0
    lost_leases: int = 0
    requests: int = 0
    purged: int = 0
    deferred: int = 0  # given back unspent: Inngest was unavailable
    handed_off: int = 0  # of the claimed: taken straight from this process's commits


@dataclass(frozen=True, slots=True)
class WorkerHealth:
    running: bool
    can_send: bool  # False: Inngest refused the event key (a configuration error)
    detail: str
    # False while Inngest is unavailable: events wait for it, nothing is spent.
    inngest_available: bool = True
