"""The stand-in Inngest itself (tests/fakes/inngest.py): the tests of delivery
trust it to answer as Inngest's server does, row by row of its contract."""

from __future__ import annotations

import json
import re
from typing import Any

import aiohttp
import pytest

from tests.fakes.inngest import QUEUE_ERROR, QUEUE_TIMEOUT, Fault, StandIn

ULID = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}")
INVALID_BODY = "Request body must contain an event object or an array of event objects"


async def _post(
    inngest: StandIn, body: bytes, *, key: str | None = None, content_type: str | None = None
) -> tuple[int, Any, aiohttp.ClientResponse]:
    url = f"{inngest.base_url}/e/{key or inngest.event_key}"  # type: ignore[attr-defined]
    headers = {"Content-Type": content_type or "application/json"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=body, headers=headers) as r,
    ):
        text = await r.text()
        return r.status, json.loads(text), r


def _events(*events: dict[str, Any]) -> bytes:
    return json.dumps(list(events)).encode()


async def test_integers_past_64_bits_are_kept_exact(inngest: StandIn) -> None:
    body = b'[{"name": "a", "data": {"big": 18446744073709551617, "low": -9223372036854775809}}]'
    status, answer, _ = await _post(inngest, body)
    assert status == 200
    assert len(answer["ids"]) == 1
    assert inngest.accepted[0]["data"] == {"big": 2**64 + 1, "low": -(2**63) - 1}


async def test_each_event_gets_a_ulid_of_its_own(inngest: StandIn) -> None:
    status, answer, r = await _post(inngest, b"[" + b",".join([b'{"name": "a"}'] * 50) + b"]")
    assert (status, answer["status"]) == (200, 200)
    assert len(set(answer["ids"])) == 50
    assert all(ULID.fullmatch(i) for i in answer["ids"])
    # Go's encoder: compact, a newline; no Content-Type set, so Go sniffs text.
    assert r.headers["Content-Type"] == "text/plain; charset=utf-8"


async def test_the_answer_is_go_encoders_text(inngest: StandIn) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{inngest.base_url}/e/{inngest.event_key}",  # type: ignore[attr-defined]
            data=b'[{"name": "inngest/x<y>"}]',
            headers={"Content-Type": "application/json"},
        ) as r,
    ):
        assert await r.read() == (
            b'{"ids":[""],"status":400,"error":'
            b'"event name is reserved for internal use: inngest/x\\u003cy\\u003e"}\n'
        )


async def test_a_single_object_is_one_event(inngest: StandIn) -> None:
    status, answer, _ = await _post(inngest, b'{"name": "a", "id": "one"}')
    assert status == 200 and len(answer["ids"]) == 1
    assert inngest.accepted_ids == ["one"]


async def test_an_empty_body_is_200_with_one_empty_id(inngest: StandIn) -> None:
    assert (await _post(inngest, b""))[:2] == (200, {"ids": [""], "status": 200})


async def test_an_unknown_key_is_401(inngest: StandIn) -> None:
    status, answer, r = await _post(inngest, _events({"name": "a"}), key="nope")
    assert (status, answer) == (401, {"status": 401, "message": "", "error": "Event key not found"})
    assert r.headers["Content-Type"] == "application/json"
    assert inngest.accepted == []


# -- one test per row of the event's own faults: prefix accepted, [""] when first --


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ({"name": ""}, "event name is empty"),
        ({"data": {}}, "event name is empty"),
        ({"name": None}, "event name is empty"),
        (
            {"name": "inngest/function.finished"},
            "event name is reserved for internal use: inngest/function.finished",
        ),  # noqa: E501
        ({"name": "Inngest/Cron"}, "event name is reserved for internal use: Inngest/Cron"),
        ({"name": "a", "ts": 315_532_799_999}, "timestamp is before Jan 1, 1980"),
        ({"name": "a", "ts": -1}, "timestamp is before Jan 1, 1980"),
        ({"name": "a", "ts": 4_102_444_800_001}, "timestamp is after Jan 1, 2100"),
        (
            {"name": "a", "data": "x"},
            "json: cannot unmarshal string into Go struct field raw.data of type map[string]interface {}",  # noqa: E501
        ),
        (
            {"name": "a", "user": []},
            "json: cannot unmarshal array into Go struct field raw.user of type map[string]interface {}",  # noqa: E501
        ),
        (
            {"name": "a", "ts": 1.5},
            "json: cannot unmarshal number 1.5 into Go struct field raw.ts of type int64",
        ),  # noqa: E501
        (
            {"name": "a", "ts": "1"},
            "json: cannot unmarshal string into Go struct field raw.ts of type int64",
        ),  # noqa: E501
        (
            {"name": "a", "id": 7},
            "json: cannot unmarshal number 7 into Go struct field raw.id of type string",
        ),  # noqa: E501
        (
            {"name": "a", "v": True},
            "json: cannot unmarshal bool into Go struct field raw.v of type string",
        ),  # noqa: E501
        (
            {"NAME": 5},
            "json: cannot unmarshal number 5 into Go struct field raw.name of type string",
        ),  # noqa: E501
        ("x", "json: cannot unmarshal string into Go value of type event.raw"),
    ],
)
@pytest.mark.parametrize("position", [0, 2])
async def test_an_invalid_event_stops_the_request_after_the_events_before_it(
    inngest: StandIn, bad: Any, error: str, position: int
) -> None:
    good = [{"name": "ok", "id": f"g{i}"} for i in range(position)]
    after = {"name": "ok", "id": "after"}
    status, answer, _ = await _post(inngest, json.dumps([*good, bad, after]).encode())
    assert status == 400
    assert answer["status"] == 400 and answer["error"] == error
    if position == 0:
        assert answer["ids"] == [""]
    else:
        assert len(answer["ids"]) == position and all(ULID.fullmatch(i) for i in answer["ids"])
    assert inngest.accepted_ids == [f"g{i}" for i in range(position)]


@pytest.mark.parametrize(
    "event",
    [
        {"name": "a", "ts": 0},  # 0 is "not given": set to now
        {"name": "a", "ts": 315_532_800_000, "data": None, "user": None, "v": None, "id": None},
        {"name": "a", "unknown": [1, 2], "data": {"nested": {"x": 1}}, "user": {"id": 1}},
        {"Name": "a"},  # encoding/json matches keys in any case
    ],
)
async def test_what_the_server_takes(inngest: StandIn, event: dict[str, Any]) -> None:
    status, answer, _ = await _post(inngest, _events(event))
    assert status == 200 and len(answer["ids"]) == 1


@pytest.mark.parametrize("body", [b"5", b'"x"', b"null", b"true"])
async def test_a_body_neither_object_nor_array(inngest: StandIn, body: bytes) -> None:
    assert (await _post(inngest, body))[:2] == (
        400,
        {"ids": [""], "status": 400, "error": INVALID_BODY},
    )


async def test_a_syntax_error_after_two_events_keeps_them(inngest: StandIn) -> None:
    status, answer, _ = await _post(inngest, b'[{"name": "a"}, {"name": "b"}, {"name": ]')
    assert status == 400
    assert answer["error"] == "invalid character ']' looking for beginning of value"
    assert len(answer["ids"]) == 2
    assert [e["name"] for e in inngest.accepted] == ["a", "b"]


async def test_an_event_over_the_size_limit_counts_its_raw_bytes(inngest: StandIn) -> None:
    inngest.max_event_bytes = 600
    # The server measures the bytes as sent (json.RawMessage), spaces included.
    fits = b'{"name": "a", "data": {"s": "' + b"x" * (600 - 32) + b'"}}'
    assert len(fits) == 600
    status, answer, _ = await _post(inngest, b"[" + fits + b"]")
    assert status == 200
    too_big = fits.replace(b'"a"', b' "a"')
    status, answer, _ = await _post(inngest, b'[{"name": "first"},' + too_big + b"]")
    assert status == 400
    assert answer["error"] == "Event is over the max size: Max 600 bytes / Size 601 bytes"
    assert len(answer["ids"]) == 1
    assert [e["name"] for e in inngest.accepted] == ["a", "first"]


async def test_more_events_than_the_limit(inngest: StandIn) -> None:
    inngest.max_events = 3
    status, answer, _ = await _post(inngest, _events(*[{"name": "a"}] * 4))
    assert status == 400
    assert answer["error"] == "Cannot have more than 3 events in a batch"
    assert len(answer["ids"]) == 3
    assert inngest.accepted_count == 3


# -- the server's own failures, also 400 --------------------------------------


async def test_a_queue_that_is_down_fails_the_first_event(inngest: StandIn) -> None:
    inngest.queue_down = True
    status, answer, _ = await _post(inngest, _events({"name": "a"}, {"name": "b"}))
    assert (status, answer) == (400, {"ids": [""], "status": 400, "error": QUEUE_ERROR})
    assert inngest.accepted == []


async def test_a_queue_timeout_mid_request_keeps_the_events_before_it(inngest: StandIn) -> None:
    inngest.queue_fault_at = 2
    inngest.fail_next(Fault.QUEUE_ERROR)
    body = _events(*[{"name": "a", "id": str(i)} for i in range(4)])
    status, answer, _ = await _post(inngest, body)
    assert (status, answer["error"]) == (400, QUEUE_TIMEOUT)
    assert len(answer["ids"]) == 2
    assert inngest.accepted_ids == ["0", "1"]
    # One request only: the next is taken whole.
    assert (await _post(inngest, _events({"name": "a"})))[0] == 200


# -- Inngest Cloud -------------------------------------------------------------


async def test_cloud_answers_413_for_sizes_and_counts(inngest: StandIn) -> None:
    inngest.cloud = True
    inngest.max_events = 2
    status, answer, _ = await _post(inngest, _events(*[{"name": "a"}] * 3))
    assert (status, answer) == (
        413,
        {"status": 413, "error": "Cannot have more than 2 events in a batch"},
    )
    inngest.max_event_bytes = 100
    status, answer, _ = await _post(inngest, _events({"name": "a", "data": {"s": "x" * 200}}))
    assert status == 413 and answer["error"].startswith("Event is over the max size")
    inngest.max_body_bytes = 50
    status, answer, _ = await _post(inngest, _events({"name": "a", "data": {"s": "x" * 60}}))
    assert (status, answer["error"]) == (413, "request body too large")
    assert inngest.accepted == []  # Cloud checks before it takes anything


async def test_cloud_rate_limit_is_429_with_retry_after(inngest: StandIn) -> None:
    inngest.fail_next(Fault.RATE_LIMIT)
    status, answer, r = await _post(inngest, _events({"name": "a"}))
    assert (status, answer) == (429, {"status": 429, "error": "rate limited"})
    assert r.headers["Retry-After"] == "1"
    assert inngest.accepted == []
