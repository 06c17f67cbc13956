"""The stand-in Inngest itself (tests/fakes/inngest.py): the tests of delivery
trust it to read events as Inngest does."""

from __future__ import annotations

import aiohttp

from tests.fakes.inngest import StandIn


async def _post(inngest: StandIn, body: bytes) -> tuple[int, dict]:
    url = f"{inngest.base_url}/e/{inngest.event_key}"  # type: ignore[attr-defined]
    headers = {"Content-Type": "application/json"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=body, headers=headers) as r,
    ):
        return r.status, await r.json()


async def test_integers_past_64_bits_are_kept_exact(inngest: StandIn) -> None:
    body = b'[{"name": "a", "data": {"big": 18446744073709551617, "low": -9223372036854775809}}]'
    status, answer = await _post(inngest, body)
    assert status == 200
    assert len(answer["ids"]) == 1
    assert inngest.accepted[0]["data"] == {"big": 2**64 + 1, "low": -(2**63) - 1}


async def test_each_event_gets_an_id_of_its_own(inngest: StandIn) -> None:
    status, answer = await _post(inngest, b"[" + b",".join([b'{"name": "a"}'] * 50) + b"]")
    assert status == 200
    assert len(set(answer["ids"])) == 50
    assert all(len(i) == 26 and int(i, 16) >= 0 for i in answer["ids"])


async def test_an_event_too_large_is_refused_and_one_at_the_limit_is_not(
    inngest: StandIn,
) -> None:
    inngest.max_event_bytes = 600
    # json.dumps of {"name": "a", "data": {"s": "xx..."}} is 32 bytes and the string.
    fits = b'{"name":"a","data":{"s":"' + b"x" * (600 - 32) + b'"}}'
    status, answer = await _post(inngest, b"[" + fits + b"]")
    assert status == 200
    status, answer = await _post(inngest, b"[" + fits.replace(b'"x', b'"xx') + b"]")
    assert (status, answer) == (413, {"status": 413, "error": "event too large"})
    assert inngest.accepted_count == 1
