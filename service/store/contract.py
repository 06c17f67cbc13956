"""What crosses the storage boundary: the outbox's states and the rows the
domain hands to a store and gets back. No imports of the service's own: every
side may use it.

The outbox's states, and who moves a row between them, are here (OutboxStatus);
each move is a function of service/outbox.py.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

from .encoding import RawJSON


class HistoryKind(enum.StrEnum):
    RETRY = "retry"  # a send failed; the row went back to pending for a later attempt
    FAILED = "failed"  # the row went to failed (refused by Inngest, or out of attempts)
    DELIVERED = "delivered"  # delivered after earlier outcomes (a first-try delivery writes none)
    HELD = "held"  # not the row's fault (a refused key, Inngest unavailable): attempts unchanged
    REPLAYED = "replayed"  # an operator put the row back to pending


class OutboxStatus(enum.StrEnum):
    # Written by the API in the same transaction as the business row. The
    # worker claims it when available_at is due; a retry puts it back here.
    PENDING = "pending"
    # Claimed by a worker under a lease (owner, token, expiry), or written so
    # by the API when its own process's worker takes the rows straight from the
    # commit (a hand-off: no claim needed). The worker moves it to delivered,
    # back to pending (retry) or failed; if the worker dies, the expired lease
    # makes the row claimable again.
    #
    # A lease is on sending rows only: every move out of sending clears it. So
    # a move out of sending may find its rows by id and lease token alone, and
    # on PostgreSQL it must: a test of the status leads the planner to the
    # sending index, which keeps every delivered row's old version until a
    # vacuum, and the move would walk them all.
    SENDING = "sending"
    # Inngest acknowledged it. Terminal; removed only by retention.
    DELIVERED = "delivered"
    # Cannot be delivered (rejected by Inngest, or out of attempts). Terminal
    # until an operator replays it.
    FAILED = "failed"


@dataclass(slots=True)  # one per request: not frozen, which costs per field
class NewEvent:
    """An event about to enter the outbox. ``payload`` is the serialised event."""

    id: str
    name: str
    payload: RawJSON
    created_at: datetime


@dataclass(frozen=True, slots=True)
class HandOff:
    """A lease for rows being written: this process's worker takes them from the
    commit, sparing their claim (see OutboxStatus.SENDING)."""

    owner: str
    token: str
    expires_at: datetime


def lease_values(hand_off: HandOff | None) -> tuple[str, str | None, str | None, datetime | None]:
    """A new row's status, lease_owner, lease_token and lease_expires_at:
    pending, or leased by ``hand_off``."""
    if hand_off is None:
        return OutboxStatus.PENDING.value, None, None, None
    return OutboxStatus.SENDING.value, hand_off.owner, hand_off.token, hand_off.expires_at


@dataclass(frozen=True, slots=True)
class ClaimedEvent:
    id: str
    payload: str  # the serialised event, sent as is
    attempts: int  # attempts before this one
    # It has a story (an earlier failed attempt, a replay): its delivery goes
    # into the history too.
    seen: bool = False

    @property
    def size(self) -> int:
        return len(self.payload.encode("utf-8"))


@dataclass(frozen=True, slots=True)
class Claim:
    token: str  # fences every later mark: a stale token marks nothing
    owner: str
    events: list[ClaimedEvent]


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """What to write into the history for rows a mark moves (None: nothing)."""

    kind: HistoryKind
    actor: str  # the worker's id
    at: datetime
    status_code: int | None = None
    error: str | None = None


# Built once per request: plain slots classes (a frozen dataclass's __init__
# goes through object.__setattr__ for every field).
@dataclass(slots=True)
class Submission:
    user_id: int
    document_name: str
    event: NewEvent
    idempotency_key: str | None = None
    request_hash: str | None = None


@dataclass(slots=True)
class Accepted:
    event_id: str
    # True when an earlier request with the same Idempotency-Key wrote it.
    replayed: bool = False


@dataclass(slots=True)
class RelayRequest:
    """One request to POST /e/{key}: its events are stored together or not at all."""

    origin: str  # the relay key's name
    events: list[NewEvent]
    received_at: datetime


@dataclass(slots=True)
class Relayed:
    # Events written by this request; the others' ids were in the outbox already
    # (a client's retry, an id sent twice).
    stored: int


class IntakeError(Exception):
    """Base class of what a submission can fail with."""


class IdempotencyKeyReused(IntakeError):
    """The key was used before by this user with a different request body."""
