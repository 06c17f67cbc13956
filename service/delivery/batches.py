"""How the worker groups rows into requests: splitting a claim to fit Inngest's
limits, and how long to let a partial batch gather."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from ..store.contract import ClaimedEvent

# A partial batch this large or larger lingers the whole WORKER_LINGER_SECONDS.
LINGER_FULL_AT = 100


def linger_seconds(linger: float, taken: int) -> float:
    """How long to let rows gather after a partial batch of ``taken`` rows."""
    return linger * min(taken / LINGER_FULL_AT, 1.0)


def split_for_request(
    events: Sequence[ClaimedEvent], *, max_events: int, max_bytes: int
) -> Iterator[list[ClaimedEvent]]:
    """Chunks that respect the per-request event count and byte size.

    An event larger than ``max_bytes`` on its own goes alone; Inngest's 413
    then fails it.
    """
    chunk: list[ClaimedEvent] = []
    size = 2  # the array's brackets
    for event in events:
        extra = event.size + (1 if chunk else 0)
        if chunk and (len(chunk) >= max_events or size + extra > max_bytes):
            yield chunk
            chunk, size, extra = [], 2, event.size
        chunk.append(event)
        size += extra
    if chunk:
        yield chunk
