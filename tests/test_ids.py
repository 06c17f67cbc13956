"""Event ids: UUIDv7, time-ordered, unique."""

from __future__ import annotations

import time
import uuid

from service.ids import new_event_id


def test_event_ids_are_uuid7_with_the_time_in_milliseconds() -> None:
    before = time.time_ns() // 1_000_000
    event_id = new_event_id()
    after = time.time_ns() // 1_000_000
    parsed = uuid.UUID(event_id)
    assert str(parsed) == event_id
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122
    assert before <= parsed.int >> 80 <= after


def test_event_ids_sort_by_time_and_never_repeat() -> None:
    ids = [new_event_id(now_ms=ms) for ms in (1, 2, 3) for _ in range(1000)]
    assert len(set(ids)) == len(ids)
    assert ids[0] < ids[1000] < ids[2000]
    assert [uuid.UUID(i).int >> 80 for i in ids[::1000]] == [1, 2, 3]
    # 74 random bits: in 1000 ids of one millisecond every bit varies.
    randoms = {uuid.UUID(i).int & ((1 << 62) - 1) for i in ids[:1000]}
    assert len(randoms) == 1000
