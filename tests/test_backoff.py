"""Backoff with full jitter and Retry-After parsing: pure functions."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from service.delivery.backoff import MAX_RETRY_AFTER_SECONDS, delay, parse_retry_after


@pytest.mark.parametrize(("attempt", "ceiling"), [(1, 1), (2, 2), (3, 4), (5, 16), (9, 100)])
def test_delay_is_uniform_below_an_exponential_ceiling(attempt: int, ceiling: float) -> None:
    rng = random.Random(1)
    samples = [delay(attempt, base=1, cap=100, rng=rng) for _ in range(2000)]
    assert all(0 <= s <= ceiling for s in samples)
    # Full jitter spreads over the whole range, not near its top.
    assert min(samples) < ceiling * 0.05
    assert max(samples) > ceiling * 0.95


def test_delay_is_reproducible_with_a_seeded_rng() -> None:
    first = [delay(3, base=0.5, cap=60, rng=random.Random(42)) for _ in range(3)]
    second = [delay(3, base=0.5, cap=60, rng=random.Random(42)) for _ in range(3)]
    assert first == second


def test_huge_attempt_numbers_stay_at_the_cap() -> None:
    assert delay(10_000, base=1, cap=30, rng=random.Random(0)) <= 30


def test_retry_after_seconds() -> None:
    now = datetime.now(UTC)
    assert parse_retry_after("7", now=now) == 7
    assert parse_retry_after(" 0 ", now=now) == 0
    assert parse_retry_after(None, now=now) is None


def test_retry_after_http_date() -> None:
    now = datetime(2026, 11, 23, 10, 0, 0, tzinfo=UTC)
    header = format_datetime(now + timedelta(seconds=90), usegmt=True)
    assert parse_retry_after(header, now=now) == 90
    past = format_datetime(now - timedelta(seconds=90), usegmt=True)
    assert parse_retry_after(past, now=now) == 0


@pytest.mark.parametrize("value", ["soon", "-5", "1.5", ""])
def test_unparseable_retry_after_is_ignored(value: str) -> None:
    assert parse_retry_after(value, now=datetime.now(UTC)) is None


def test_retry_after_is_capped() -> None:
    assert parse_retry_after("99999999", now=datetime.now(UTC)) == MAX_RETRY_AFTER_SECONDS
