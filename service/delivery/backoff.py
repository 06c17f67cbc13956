"""Retry timing: exponential backoff with full jitter, and Retry-After."""

from __future__ import annotations

import random
from datetime import datetime
from email.utils import parsedate_to_datetime

# A Retry-After further away than this is treated as this: a misbehaving
# proxy must not park the outbox for a week.
MAX_RETRY_AFTER_SECONDS = 3600.0


def delay(attempt: int, *, base: float, cap: float, rng: random.Random) -> float:
    """Seconds to wait before attempt ``attempt + 1`` ("full jitter").

    Uniform in [0, min(cap, base * 2 ** (attempt - 1))]: spreads the retries of
    many rows and many workers instead of sending them back together.
    """
    ceiling = min(cap, base * 2 ** min(max(attempt - 1, 0), 62))
    return rng.uniform(0, ceiling)


def parse_retry_after(value: str | None, *, now: datetime) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        seconds = (when - now).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)
