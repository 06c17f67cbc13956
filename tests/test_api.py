"""POST /api: every success and error path, with exact status codes and bodies."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from aiohttp.test_utils import TestClient
from sqlalchemy.ext.asyncio import AsyncEngine

from service import auth
from service.app import create_app
from service.config import Settings
from service.models import documents, outbox
from service.store.database import Database
from service.web.body import parse_json_object
from tests.conftest import PASSWORD
from tests.support.net import answer_to_a_cut_request

PROBLEM = "application/problem+json"


async def rows(engine: AsyncEngine) -> tuple[list[Any], list[Any]]:
    async with engine.connect() as conn:
        docs = (await conn.execute(sa.select(documents).order_by(documents.c.id))).all()
        events = (await conn.execute(sa.select(outbox).order_by(outbox.c.created_at))).all()
    return docs, events


async def problem(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status == status, await response.text()
    assert response.content_type == PROBLEM
    body = await response.json(content_type=PROBLEM)
    assert body["status"] == status
    assert body["code"] == code
    assert body["type"] == f"https://inngest-outbox.dev/problems/{code}"
    assert body["instance"] == "/api" or body["instance"].startswith("/")
    return body


async def test_accepts_a_document_and_writes_both_rows(
    logged_in: TestClient, engine: AsyncEngine, user: auth.User, settings: Settings
) -> None:
    response = await logged_in.post("/api", json={"documentName": "reports/q3.pdf"})
    assert response.status == 200
    body = await response.json()
    assert body["status"] == "ok"
    assert set(body) == {"status", "id"}
    assert uuid.UUID(body["id"]).version == 7

    docs, events = await rows(engine)
    assert [(d.user_id, d.document_name, d.event_id) for d in docs] == [
        (user.id, "reports/q3.pdf", body["id"])
    ]
    [row] = events
    assert row.id == body["id"]
    assert row.status == "pending"
    assert row.attempts == 0
    assert row.event_name == settings.inngest_event_name
    assert row.available_at == row.created_at
    assert row.lease_owner is None and row.delivered_at is None


async def test_event_has_the_contract_shape(
    logged_in: TestClient, engine: AsyncEngine, user: auth.User, settings: Settings
) -> None:
    sent = {"documentName": "a.txt", "data": {"pages": 3}, "priority": "high"}
    response = await logged_in.post("/api", json=sent)
    event_id = (await response.json())["id"]
    _, [row] = await rows(engine)
    event = row.payload
    assert set(event) == {"id", "name", "data", "user", "ts", "v"}
    assert event["id"] == event_id
    assert event["name"] == settings.inngest_event_name
    # Every field of the body travels as event data, the client's own "data" too.
    assert event["data"] == sent
    assert event["user"] == {"id": user.id, "username": "alice"}
    assert isinstance(event["ts"], int)
    assert abs(event["ts"] - row.created_at.timestamp() * 1000) < 1000
    assert event["v"] == "1"


async def test_a_client_cannot_choose_the_event_name_or_id(
    logged_in: TestClient, engine: AsyncEngine, settings: Settings
) -> None:
    response = await logged_in.post(
        "/api", json={"documentName": "a", "name": "inngest/evil", "id": "mine"}
    )
    assert response.status == 200
    _, [row] = await rows(engine)
    assert row.payload["name"] == settings.inngest_event_name
    assert row.payload["id"] == row.id != "mine"


async def test_no_secret_goes_into_the_event(
    logged_in: TestClient, engine: AsyncEngine, settings: Settings, aws_env
) -> None:
    await logged_in.post("/api", json={"documentName": "a"})
    _, [row] = await rows(engine)
    text = json.dumps(row.payload)
    assert settings.session_secret is not None
    for secret in (
        settings.inngest_event_key,
        aws_env.app_keys.secret_access_key,
        aws_env.app_keys.access_key_id,
        PASSWORD,
    ):
        assert secret not in text


async def test_each_post_gets_a_fresh_event_id(logged_in: TestClient, engine: AsyncEngine) -> None:
    ids = [
        (await (await logged_in.post("/api", json={"documentName": f"d{i}"})).json())["id"]
        for i in range(5)
    ]
    assert len(set(ids)) == 5
    _, events = await rows(engine)
    assert sorted(e.id for e in events) == sorted(ids)


async def test_unauthenticated_is_401(client: TestClient, engine: AsyncEngine) -> None:
    response = await client.post("/api", json={"documentName": "a"})
    body = await problem(response, 401, "unauthenticated")
    assert body["title"] == "Not logged in"
    assert await rows(engine) == ([], [])


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"],
)
async def test_non_json_content_type_is_415(
    logged_in: TestClient, engine: AsyncEngine, content_type: str
) -> None:
    response = await logged_in.post(
        "/api", data=b'{"documentName": "a"}', headers={"Content-Type": content_type}
    )
    body = await problem(response, 415, "unsupported_media_type")
    assert body["detail"] == f"Send Content-Type: application/json (got {content_type})."
    assert await rows(engine) == ([], [])


async def test_missing_content_type_is_415(logged_in: TestClient) -> None:
    response = await logged_in.post("/api", data=b'{"documentName": "a"}', headers={})
    await problem(response, 415, "unsupported_media_type")


async def test_json_with_another_charset_is_415(logged_in: TestClient) -> None:
    response = await logged_in.post(
        "/api",
        data='{"documentName": "a"}'.encode("utf-16"),
        headers={"Content-Type": "application/json; charset=utf-16"},
    )
    body = await problem(response, 415, "unsupported_media_type")
    assert body["detail"] == "JSON must be UTF-8, not utf-16."


async def test_json_suffix_and_utf8_charset_are_accepted(logged_in: TestClient) -> None:
    for content_type in ("application/json; charset=UTF-8", "application/vnd.doc+json"):
        response = await logged_in.post(
            "/api", data=b'{"documentName": "a"}', headers={"Content-Type": content_type}
        )
        assert response.status == 200, content_type


async def test_malformed_json_is_400_and_says_where(
    logged_in: TestClient, engine: AsyncEngine
) -> None:
    response = await logged_in.post(
        "/api",
        data=b'{\n  "documentName": "a",\n  oops}',
        headers={"Content-Type": "application/json"},
    )
    body = await problem(response, 400, "malformed_json")
    assert body["line"] == 3
    assert body["column"] == 3
    assert (
        body["detail"] == "Expecting property name enclosed in double quotes at line 3, column 3."
    )
    assert await rows(engine) == ([], [])


@pytest.mark.parametrize(
    ("raw", "detail"),
    [
        (b'{"documentName": "a", "documentName": "b"}', "Duplicate key 'documentName'."),
        # A colon in a string, and a key repeated deeper down: not by the count of colons.
        (b'{"documentName": "a:b", "x": {"k": 1, "k": 1}}', "Duplicate key 'k'."),
        (b'{"documentName": "a", "d": [{"k": ":"}, {"k": 1, "k": 2}]}', "Duplicate key 'k'."),
        (b'{"documentName": "a", "n": NaN}', "NaN is not valid JSON."),
        (b'{"documentName": "a", "n": Infinity}', "Infinity is not valid JSON."),
        (b'{"documentName": "a", "n": 1e999}', "The number 1e999 is out of range."),
        (b'{"documentName": "a", "n": -1e400}', "The number -1e400 is out of range."),
        (b'{"documentName": "\xff"}', "The body is not UTF-8 (invalid byte at offset 18)."),
        (b"[" * 100_000 + b"]" * 100_000, "The JSON is nested too deeply."),
        # Within what orjson parses (1023 levels), past what the event encoders write.
        (
            b'{"documentName": "a", "d": ' + b"[" * 1000 + b"]" * 1000 + b"}",
            "The JSON is nested too deeply.",
        ),
        (b"", "Expecting value at line 1, column 1."),
    ],
)
async def test_invalid_json_is_400(logged_in: TestClient, raw: bytes, detail: str) -> None:
    response = await logged_in.post("/api", data=raw, headers={"Content-Type": "application/json"})
    body = await problem(response, 400, "malformed_json")
    assert body["detail"] == detail


@pytest.mark.parametrize(
    "raw",
    [
        b'{"documentName": "a", "data": {"pages": 3, "priority": "normal", "ok": true}}',
        b'{"documentName": "reports/q3.pdf", "at": "12:30", "tags": ["a:b", null, 1.5e-7]}',
        b'{"documentName": "a", "b": 123456789012345678901234567890, "n": -9223372036854775809}',
        b'{"documentName": "a", "u": 18446744073709551615, "v": [18446744073709551616, 1e19]}',
        b'{"documentName": "\\u00e9t\\u00e9 \xe2\x9c\x93", "n": -0.0, "e": 1E5}',
        b'{"documentName": "a", "x": "' + b"y" * 9000 + b'"}',
    ],
    ids=["plain", "colons-in-strings", "past-64-bits", "at-64-bits", "escapes", "past-8-kib"],
)
def test_every_body_parses_to_exactly_what_the_strict_parser_gives(raw: bytes) -> None:
    # The fast path (orjson) where it can be sure, the strict parser elsewhere:
    # the same values, of the same types, either way.
    fast, strict = parse_json_object(raw), json.loads(raw)
    assert fast == strict
    assert repr(fast) == repr(strict)  # 1 is not 1.0, and no integer became a float


async def test_huge_integer_is_400(logged_in: TestClient) -> None:
    raw = b'{"documentName": "a", "n": ' + b"9" * 5000 + b"}"
    response = await logged_in.post("/api", data=raw, headers={"Content-Type": "application/json"})
    body = await problem(response, 400, "malformed_json")
    assert "4300" in body["detail"]


async def test_lone_surrogate_is_400(logged_in: TestClient, engine: AsyncEngine) -> None:
    raw = b'{"documentName": "a", "note": "\\ud800"}'
    response = await logged_in.post("/api", data=raw, headers={"Content-Type": "application/json"})
    body = await problem(response, 400, "malformed_json")
    assert body["detail"] == "A string in the body contains an unpaired UTF-16 surrogate."
    assert await rows(engine) == ([], [])


def _nested(depth: int) -> Any:
    value: Any = "deep"
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "value",
    [10**30, -(2**64), _nested(300), {"é": "\u2028 ✓"}, {"q": 'a "quoted" \\ back\\slash'}],
    ids=["past-64-bits", "negative-past-64-bits", "nested-300-deep", "non-ascii", "escapes"],
)
async def test_event_is_stored_exactly_whatever_the_encoder(
    logged_in: TestClient, engine: AsyncEngine, value: Any
) -> None:
    # The fast encoder takes none of the first three: the standard one must.
    body = {"documentName": "a", "value": value}
    response = await logged_in.post("/api", json=body)
    assert response.status == 200, await response.text()
    event_id = (await response.json())["id"]
    async with engine.connect() as conn:
        text = (await conn.execute(sa.select(sa.cast(outbox.c.payload, sa.Text)))).scalar_one()
    event = json.loads(text)
    assert event["id"] == event_id
    assert event["data"] == body
    assert "\\u" not in text  # UTF-8 as it is, not escaped
    # Stored as encoded, compact: the single-statement insert changed nothing.
    assert text == json.dumps(event, ensure_ascii=False, separators=(",", ":"))


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (b"[]", "an array"),
        (b'"x"', "a string"),
        (b"3", "a number"),
        (b"null", "null"),
        (b"true", "a boolean"),
    ],
)
async def test_body_that_is_not_an_object_is_400(
    logged_in: TestClient, raw: bytes, kind: str
) -> None:
    response = await logged_in.post("/api", data=raw, headers={"Content-Type": "application/json"})
    body = await problem(response, 400, "invalid_body")
    assert body["detail"] == f"Expected a JSON object, got {kind}."


async def test_body_over_the_limit_is_413(alice_on, engine: AsyncEngine) -> None:
    client: TestClient = await alice_on(max_body_bytes=4096)
    big = {"documentName": "a", "blob": "x" * 5000}
    response = await client.post("/api", json=big)
    body = await problem(response, 413, "payload_too_large")
    assert body["limit"] == 4096
    assert body["detail"] == "The body may be at most 4096 bytes."
    assert await rows(engine) == ([], [])


async def test_chunked_body_over_the_limit_is_413(alice_on, engine: AsyncEngine) -> None:
    client: TestClient = await alice_on(max_body_bytes=4096)

    async def chunks():
        yield b'{"documentName": "a", "blob": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    response = await client.post(
        "/api", data=chunks(), headers={"Content-Type": "application/json"}
    )
    await problem(response, 413, "payload_too_large")
    assert await rows(engine) == ([], [])


async def test_default_body_limit_is_256_kib(logged_in: TestClient) -> None:
    body = {"documentName": "a", "blob": "x" * (256 * 1024)}
    response = await logged_in.post("/api", json=body)
    problem_body = await problem(response, 413, "payload_too_large")
    assert problem_body["limit"] == 256 * 1024


async def test_event_over_the_per_event_limit_is_413(alice_on, engine: AsyncEngine) -> None:
    # The body fits, the event (body plus id, name, user, ts) does not.
    client: TestClient = await alice_on(max_body_bytes=8192, max_event_bytes=2048)
    payload = {"documentName": "a", "blob": "x" * 1990}
    response = await client.post("/api", json=payload)
    body = await problem(response, 413, "event_too_large")
    assert body["limit"] == 2048
    assert body["size"] > 2048
    assert await rows(engine) == ([], [])


async def test_event_size_counts_utf8_bytes(alice_on, engine: AsyncEngine) -> None:
    client: TestClient = await alice_on(max_body_bytes=8192, max_event_bytes=2048)
    # 700 characters, 2100 bytes of UTF-8: over the limit although short in characters.
    response = await client.post("/api", json={"documentName": "a", "t": "€" * 700})
    await problem(response, 413, "event_too_large")


@pytest.mark.parametrize(
    ("payload", "rule", "detail"),
    [
        ({}, "required", "documentName is required."),
        ({"documentname": "a"}, "required", "documentName is required."),
        ({"documentName": None}, "type", "documentName must be a string."),
        ({"documentName": 42}, "type", "documentName must be a string."),
        ({"documentName": ["a"]}, "type", "documentName must be a string."),
        ({"documentName": ""}, "empty", "documentName must not be empty."),
        ({"documentName": "   "}, "empty", "documentName must not be empty."),
        (
            {"documentName": "é" * 513},
            "too_long",
            "documentName may be at most 1024 bytes of UTF-8, not 1026.",
        ),
        (
            {"documentName": "a\nb"},
            "control_characters",
            "documentName must not contain control characters (U+000A).",
        ),
        (
            {"documentName": "a\x00b"},
            "control_characters",
            "documentName must not contain control characters (U+0000).",
        ),
        (
            {"documentName": "a\x85b"},
            "control_characters",
            "documentName must not contain control characters (U+0085).",
        ),
        (
            {"documentName": "invoice\u202efdp.exe"},  # shows as invoiceexe.pdf
            "format_characters",
            "documentName must not contain invisible format characters such as bidi controls "
            "(U+202E).",
        ),
        (
            {"documentName": "a\u200bb"},  # zero-width space
            "format_characters",
            "documentName must not contain invisible format characters such as bidi controls "
            "(U+200B).",
        ),
        (
            {"documentName": "a\U000e0041"},  # a tag character
            "format_characters",
            "documentName must not contain invisible format characters such as bidi controls "
            "(U+E0041).",
        ),
        (
            {"documentName": "a\ue000"},
            "private_use",
            "documentName must not contain private-use characters (U+E000).",
        ),
        (
            {"documentName": "a\U0010fffd"},
            "private_use",
            "documentName must not contain private-use characters (U+10FFFD).",
        ),
        (
            {"documentName": "a\U0003fffe"},
            "unassigned",
            "documentName must not contain unassigned code points (U+3FFFE).",
        ),
        (
            {"documentName": "a\u2028b"},
            "line_separator",
            "documentName must not contain line or paragraph separators (U+2028).",
        ),
        (
            {"documentName": "a\u2029b"},
            "line_separator",
            "documentName must not contain line or paragraph separators (U+2029).",
        ),
        (
            {"documentName": "/etc/passwd"},
            "leading_slash",
            "documentName must not start with '/' or '\\'.",
        ),
        (
            {"documentName": "\\\\server\\share"},
            "leading_slash",
            "documentName must not start with '/' or '\\'.",
        ),
        ({"documentName": "a/../b"}, "dot_segment", "documentName must not have a '..' segment."),
        ({"documentName": ".."}, "dot_segment", "documentName must not have a '..' segment."),
        ({"documentName": "a\\..\\b"}, "dot_segment", "documentName must not have a '..' segment."),
        (
            {"documentName": "\ud800"},
            "invalid_unicode",
            "documentName contains an unpaired UTF-16 surrogate.",
        ),
    ],
)
async def test_bad_document_name_is_400_naming_field_and_rule(
    logged_in: TestClient, engine: AsyncEngine, payload: dict[str, Any], rule: str, detail: str
) -> None:
    raw = json.dumps(payload).encode()
    response = await logged_in.post("/api", data=raw, headers={"Content-Type": "application/json"})
    body = await problem(response, 400, "invalid_field")
    assert body["field"] == "documentName"
    assert body["rule"] == rule
    assert body["detail"] == detail
    assert await rows(engine) == ([], [])


@pytest.mark.parametrize(
    "name", ["a", "é" * 512, "x" * 1024, "a..b", "..a/b..", "reports/2026/q3.pdf", "日本語.txt"]
)
async def test_good_document_names_are_accepted(logged_in: TestClient, name: str) -> None:
    response = await logged_in.post("/api", json={"documentName": name})
    assert response.status == 200, await response.text()


async def test_s3_unavailable_is_503_and_writes_nothing(
    aiohttp_client, settings: Settings, engine: AsyncEngine, user: auth.User
) -> None:
    client: TestClient = await aiohttp_client(
        create_app(settings.replace(s3_bucket="no-such-bucket-503"))
    )
    await client.post("/auth/login", json={"username": "alice", "password": PASSWORD})
    response = await client.post("/api", json={"documentName": "a"})
    body = await problem(response, 503, "s3_unavailable")
    assert response.headers["Retry-After"] == "30"
    assert body["detail"] == (
        "The service's S3 credentials are not configured or failed their last check."
    )
    assert await rows(engine) == ([], [])


async def test_s3_not_configured_is_503(alice_on, engine: AsyncEngine) -> None:
    client: TestClient = await alice_on(s3_bucket=None)
    response = await client.post("/api", json={"documentName": "a"})
    await problem(response, 503, "s3_unavailable")


async def test_database_unavailable_is_503_and_writes_nothing(
    logged_in: TestClient, engine: AsyncEngine
) -> None:
    async with engine.begin() as conn:
        await conn.exec_driver_sql("DROP TABLE outbox_history")
        await conn.exec_driver_sql("DROP TABLE outbox")
    response = await logged_in.post("/api", json={"documentName": "a"})
    body = await problem(response, 503, "database_unavailable")
    assert body["detail"] == "Nothing was written; retry shortly."
    assert response.headers["Retry-After"] == "5"
    async with engine.connect() as conn:
        count = await conn.scalar(sa.select(sa.func.count()).select_from(documents))
    assert count == 0  # the document row was rolled back with the failed outbox insert


class TestIdempotencyKey:
    async def test_repeat_returns_the_first_answer_and_writes_nothing(
        self, logged_in: TestClient, engine: AsyncEngine
    ) -> None:
        headers = {"Idempotency-Key": "order-17"}
        first = await logged_in.post("/api", json={"documentName": "a"}, headers=headers)
        again = await logged_in.post("/api", json={"documentName": "a"}, headers=headers)
        assert first.status == again.status == 200
        assert await again.json() == await first.json()
        assert "Idempotent-Replayed" not in first.headers
        assert again.headers["Idempotent-Replayed"] == "true"
        docs, events = await rows(engine)
        assert len(docs) == len(events) == 1
        assert docs[0].idempotency_key == "order-17"

    async def test_concurrent_repeats_write_once(
        self, logged_in: TestClient, engine: AsyncEngine
    ) -> None:
        import asyncio

        headers = {"Idempotency-Key": "k"}
        responses = await asyncio.gather(
            *[
                logged_in.post("/api", json={"documentName": "a"}, headers=headers)
                for _ in range(20)
            ]
        )
        ids = {(await r.json())["id"] for r in responses}
        assert [r.status for r in responses] == [200] * 20
        assert len(ids) == 1
        docs, events = await rows(engine)
        assert len(docs) == len(events) == 1

    async def test_same_key_with_another_body_is_422(
        self, logged_in: TestClient, engine: AsyncEngine
    ) -> None:
        headers = {"Idempotency-Key": "k1"}
        await logged_in.post("/api", json={"documentName": "a"}, headers=headers)
        response = await logged_in.post("/api", json={"documentName": "b"}, headers=headers)
        body = await problem(response, 422, "idempotency_key_reused")
        assert body["detail"] == (
            "This Idempotency-Key was already used with a different request body."
        )
        docs, events = await rows(engine)
        assert len(docs) == len(events) == 1

    async def test_key_order_in_the_body_does_not_matter(self, logged_in: TestClient) -> None:
        headers = {"Idempotency-Key": "k2", "Content-Type": "application/json"}
        first = await logged_in.post("/api", data=b'{"documentName":"a","x":1}', headers=headers)
        again = await logged_in.post("/api", data=b'{"x": 1, "documentName": "a"}', headers=headers)
        assert again.status == 200
        assert (await again.json())["id"] == (await first.json())["id"]

    async def test_keys_are_per_user(
        self,
        logged_in: TestClient,
        db: Database,
        engine: AsyncEngine,
        aiohttp_client,
        client: TestClient,
    ) -> None:
        await auth.create_user(db, "bob", PASSWORD)
        bob: TestClient = await aiohttp_client(client.server)
        await bob.post("/auth/login", json={"username": "bob", "password": PASSWORD})
        headers = {"Idempotency-Key": "shared"}
        a = await logged_in.post("/api", json={"documentName": "a"}, headers=headers)
        b = await bob.post("/api", json={"documentName": "a"}, headers=headers)
        assert a.status == b.status == 200
        assert (await a.json())["id"] != (await b.json())["id"]
        assert "Idempotent-Replayed" not in b.headers
        docs, events = await rows(engine)
        assert len(docs) == len(events) == 2

    @pytest.mark.parametrize("key", ["", "a" * 256, "has space", "tab\tkey", "ключ"])
    async def test_malformed_key_is_400(self, logged_in: TestClient, key: str) -> None:
        response = await logged_in.post(
            "/api",
            json={"documentName": "a"},
            headers={"Idempotency-Key": key.encode().decode("latin-1")},
        )
        body = await problem(response, 400, "invalid_idempotency_key")
        assert body["detail"] == "An Idempotency-Key is 1 to 255 visible ASCII characters."


async def test_unknown_route_is_problem_404(client: TestClient) -> None:
    response = await client.get("/nope")
    assert response.status == 404
    assert response.content_type == PROBLEM
    body = await response.json(content_type=PROBLEM)
    assert (body["code"], body["detail"]) == ("not_found", "No such resource.")


async def test_wrong_method_is_problem_405(client: TestClient) -> None:
    response = await client.get("/api")
    assert response.status == 405
    body = await response.json(content_type=PROBLEM)
    assert body["code"] == "method_not_allowed"
    assert response.headers["Allow"] == "POST"


async def test_every_response_carries_a_request_id(client: TestClient) -> None:
    response = await client.get("/healthz", headers={"X-Request-Id": "abc-123"})
    assert response.headers["X-Request-Id"] == "abc-123"
    response = await client.get("/healthz", headers={"X-Request-Id": "bad id with spaces"})
    generated = response.headers["X-Request-Id"]
    assert len(generated) == 22 and generated != "bad id with spaces"


async def test_healthz(client: TestClient) -> None:
    response = await client.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}


@pytest.mark.parametrize(
    "name",
    [
        "👩\u200d💻 notes.pdf",  # an emoji sequence joined by ZWJ
        "क्\u200dष.txt",  # a conjunct needing ZWJ
        "e\u0301t\u00e9.pdf",  # combining and precomposed accents (kept as sent)
        "a\u00a0b.pdf",  # a no-break space
        "文档.docx",
        "\U0001f600.png",
    ],
)
async def test_names_in_every_script_are_accepted_as_sent(
    logged_in: TestClient, engine: AsyncEngine, name: str
) -> None:
    response = await logged_in.post("/api", json={"documentName": name})
    assert response.status == 200, await response.text()
    documents_rows, _ = await rows(engine)
    assert [d.document_name for d in documents_rows] == [name]


# -- cross-site requests ----------------------------------------------------------


@pytest.mark.parametrize(
    "origin", ["https://evil.example", "null", "http://127.0.0.1.evil.example"]
)
async def test_a_cross_site_post_is_403_and_writes_nothing(
    logged_in: TestClient, engine: AsyncEngine, origin: str
) -> None:
    response = await logged_in.post("/api", json={"documentName": "a"}, headers={"Origin": origin})
    body = await problem(response, 403, "origin_not_allowed")
    assert body["detail"] == "This origin may not send requests here; see ALLOWED_ORIGINS."
    assert await rows(engine) == ([], [])


async def test_a_cross_site_login_is_refused_too(client: TestClient, user: auth.User) -> None:
    response = await client.post(
        "/auth/login",
        json={"username": "alice", "password": PASSWORD},
        headers={"Origin": "https://evil.example"},
    )
    await problem(response, 403, "origin_not_allowed")
    assert "set-cookie" not in response.headers


async def test_same_site_and_allowed_origins_may_post(alice_on, engine: AsyncEngine) -> None:
    client: TestClient = await alice_on(allowed_origins=frozenset({"https://app.example"}))
    own = f"http://{client.server.host}:{client.server.port}"
    for origin in (own, "https://app.example", "HTTPS://APP.EXAMPLE/"):
        response = await client.post("/api", json={"documentName": "a"}, headers={"Origin": origin})
        assert response.status == 200, (origin, await response.text())
    response = await client.get("/auth/me", headers={"Origin": "https://evil.example"})
    assert response.status == 200  # reads are not refused: they change nothing


async def test_the_own_origin_must_match_in_scheme_and_port(
    logged_in: TestClient, engine: AsyncEngine
) -> None:
    host, port = logged_in.server.host, logged_in.server.port
    for origin in (f"https://{host}:{port}", f"http://{host}:{port + 1}", f"http://{host}"):
        response = await logged_in.post(
            "/api", json={"documentName": "a"}, headers={"Origin": origin}
        )
        await problem(response, 403, "origin_not_allowed")
    assert await rows(engine) == ([], [])


async def test_behind_a_tls_proxy_the_origin_is_https(alice_on, engine: AsyncEngine) -> None:
    import ipaddress

    client: TestClient = await alice_on(trusted_proxies=(ipaddress.ip_network("127.0.0.1"),))
    own = f"{client.server.host}:{client.server.port}"
    proxied = {"X-Forwarded-Proto": "https"}
    response = await client.post(
        "/api", json={"documentName": "a"}, headers={**proxied, "Origin": f"https://{own}"}
    )
    assert response.status == 200, await response.text()
    response = await client.post(
        "/api", json={"documentName": "a"}, headers={**proxied, "Origin": f"http://{own}"}
    )
    await problem(response, 403, "origin_not_allowed")


async def test_a_forwarded_scheme_from_an_untrusted_peer_is_ignored(
    logged_in: TestClient, engine: AsyncEngine
) -> None:
    own = f"{logged_in.server.host}:{logged_in.server.port}"
    response = await logged_in.post(
        "/api",
        json={"documentName": "a"},
        headers={"X-Forwarded-Proto": "https", "Origin": f"https://{own}"},
    )
    await problem(response, 403, "origin_not_allowed")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_a_locked_database_is_503_writes_nothing_and_recovers(
    logged_in: TestClient, engine: AsyncEngine, db_url: str
) -> None:
    """Another program holds SQLite's write lock past the busy timeout (5 s)."""
    import sqlite3

    holder = sqlite3.connect(db_url.removeprefix("sqlite+aiosqlite:///"), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        response = await logged_in.post("/api", json={"documentName": "a"})
        body = await problem(response, 503, "database_unavailable")
        assert body["detail"] == "Nothing was written; retry shortly."
        assert response.headers["Retry-After"] == "5"
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    response = await logged_in.post("/api", json={"documentName": "b"})
    assert response.status == 200, await response.text()
    documents_rows, events = await rows(engine)
    assert [d.document_name for d in documents_rows] == ["b"]
    assert len(events) == 1


async def test_a_body_that_trickles_in_is_408_writes_nothing_and_ends_the_connection(
    alice_on, engine: AsyncEngine
) -> None:

    client: TestClient = await alice_on(body_timeout_seconds=0.3)
    cookies = client.session.cookie_jar.filter_cookies(client.make_url("/"))
    cookie = "; ".join(f"{name}={morsel.value}" for name, morsel in cookies.items())
    head, body = await answer_to_a_cut_request(
        client.server.host,
        client.server.port,
        b"POST /api HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\nCookie: " + cookie.encode() + b'\r\n\r\n{"documentName": ',
    )
    assert head.startswith(b"HTTP/1.1 408 ")
    assert b"\r\nConnection: close\r\n" in head
    assert json.loads(body) == {
        "type": "https://inngest-outbox.dev/problems/request_timeout",
        "title": "The body did not arrive in time",
        "status": 408,
        "code": "request_timeout",
        "detail": "The request body took longer than 0.3 seconds to arrive.",
        "instance": "/api",
    }
    assert await rows(engine) == ([], [])
