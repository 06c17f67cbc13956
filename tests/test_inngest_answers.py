"""How the worker reads each of Inngest's answers (service/delivery/inngest.py),
row by row of the table in shared/inngest-event-api.md."""

from __future__ import annotations

import json

import aiohttp
import pytest

from service.delivery.inngest import (
    EVENT_FAULTS,
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
from tests.fakes.inngest import MAX_EVENTS, POISON_ERROR, QUEUE_ERROR, QUEUE_TIMEOUT, StandIn

ID = "01JF3Z6ZK7M0S6Q4Y4N3T5V8WX"


@pytest.fixture
async def client() -> InngestClient:
    async with aiohttp.ClientSession() as session:
        yield InngestClient(session, base_url="http://127.0.0.1:9", event_key="secret-key")


def answer(client: InngestClient, status: int, body: object, count: int = 3) -> Outcome:
    text = body if isinstance(body, str) else json.dumps(body) + "\n"
    return client._classify(status, text, count, None)


async def test_the_answer_to_a_batch_of_the_most_events_is_read_whole(inngest: StandIn) -> None:
    """Its ids alone are over 140 kB: an answer cut short would read as no
    delivery, and the batch would be sent again and again."""
    payloads = [json.dumps({"name": "big/batch", "id": f"event-{i}"}) for i in range(MAX_EVENTS)]
    async with aiohttp.ClientSession() as session:
        client = InngestClient(
            session,
            base_url=inngest.base_url,  # type: ignore[attr-defined]
            event_key=inngest.event_key,
        )
        assert await client.send(payloads) == Accepted()
    assert inngest.request_count == 1
    assert [e["id"] for e in inngest.accepted] == [f"event-{i}" for i in range(MAX_EVENTS)]


def test_200_with_one_id_an_event_is_delivered(client: InngestClient) -> None:
    assert answer(client, 200, {"ids": [ID, ID, ID], "status": 200}) == Accepted()


@pytest.mark.parametrize(
    "ids",
    [[""], ["", "", ""], [ID, "", ID], [ID, ID], [ID, ID, ID, ID], [ID, ID, None], None, "x"],
)
def test_200_without_a_non_empty_id_for_each_event_is_no_delivery(
    client: InngestClient, ids: object
) -> None:
    outcome = answer(client, 200, {"ids": ids, "status": 200})
    assert isinstance(outcome, Transient) and outcome.status == 200
    assert outcome.error.startswith("unexpected answer to 3 events: HTTP 200: ")


@pytest.mark.parametrize("message", [m for m, _ in EVENT_FAULTS] + [POISON_ERROR])
@pytest.mark.parametrize(("ids", "accepted"), [([""], 0), ([ID], 1), ([ID, ID], 2)])
def test_400_that_blames_an_event_delivers_the_prefix_and_isolates_the_rest(
    client: InngestClient, message: str, ids: list[str], accepted: int
) -> None:
    outcome = answer(client, 400, {"ids": ids, "status": 400, "error": message + ": detail"})
    assert outcome == Rejected(accepted, f"HTTP 400: {message}: detail")


@pytest.mark.parametrize(
    "error", [QUEUE_ERROR, QUEUE_TIMEOUT, "context canceled", "", "event name is reserved"[1:]]
)
@pytest.mark.parametrize(("ids", "accepted"), [([""], 0), ([ID], 1), ([ID, ID], 2)])
def test_400_of_inngests_own_failure_delivers_the_prefix_and_retries_the_rest(
    client: InngestClient, error: str, ids: list[str], accepted: int
) -> None:
    outcome = answer(client, 400, {"ids": ids, "status": 400, "error": error})
    assert isinstance(outcome, IngestFailed)
    assert outcome.accepted == accepted
    assert outcome.error.startswith("HTTP 400, Inngest failed to take the events: ")


def test_400_that_is_not_json_is_inngest_failing(client: InngestClient) -> None:
    outcome = answer(client, 400, "<html>bad gateway</html>")
    assert outcome == IngestFailed(
        0, "HTTP 400, Inngest failed to take the events: <html>bad gateway</html>"
    )


def test_the_key_never_reaches_a_recorded_error(client: InngestClient) -> None:
    outcome = answer(client, 400, {"ids": [""], "status": 400, "error": "bad /e/secret-key"})
    assert isinstance(outcome, IngestFailed) and "secret-key" not in outcome.error


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (413, TooLarge),
        (401, KeyRejected),
        (403, KeyRejected),
        (404, KeyRejected),
        (429, Unavailable),
        (502, Unavailable),
        (503, Unavailable),
        (504, Unavailable),
        (500, Transient),
        (418, Transient),
        (302, Transient),
    ],
)
def test_other_statuses(client: InngestClient, status: int, kind: type) -> None:
    assert isinstance(answer(client, status, {"status": status, "error": "x"}), kind)
