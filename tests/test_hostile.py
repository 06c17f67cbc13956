"""What aiohttp's parser refuses, before any handler runs, answered by the real
`serve` process as problem+json: raw bytes on a socket, as a hostile client sends them."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import pytest

from tests.support.service import ServiceProcess, query

pytestmark = pytest.mark.slow

BAD_REQUEST = {
    "type": "https://inngest-outbox.dev/problems/bad_request",
    "title": "Bad request",
    "status": 400,
    "code": "bad_request",
    "detail": "The request is not valid HTTP/1.1 (method, target, headers or framing).",
}
HEADERS_TOO_LARGE = {
    "type": "https://inngest-outbox.dev/problems/headers_too_large",
    "title": "Request headers too large",
    "status": 431,
    "code": "headers_too_large",
    "detail": "A request line or header is longer than the server accepts.",
}


async def exchange(port: int, raw: bytes) -> tuple[str, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(10):
            answer = await reader.read()  # the server closes after an error
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    return status, headers, body


async def test_malformed_http_is_a_problem_and_writes_nothing(
    tmp_path: Path, service_env: dict[str, str]
) -> None:
    env = {**service_env, "LOG_LEVEL": "INFO"}
    service = await ServiceProcess(["serve", "--no-worker"], env=env, cwd=tmp_path).started()
    cases = [
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n", 431),
        (b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 431),
        (b"POST /api HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400),
        (b"POST /api HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (
            b"POST /api HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Length: 3\r\n\r\n",
            400,
        ),
        (b"POST /api HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n", 400),
    ]
    try:
        for raw, status in cases:
            line, headers, body = await exchange(service.port, raw)
            assert line.split(" ", 2)[1] == str(status), (raw[:60], line)
            assert headers["content-type"] == "application/problem+json; charset=utf-8"
            assert json.loads(body) == (HEADERS_TOO_LARGE if status == 431 else BAD_REQUEST)
            assert b"aaaa" not in body  # nothing of the request is echoed
    finally:
        assert service.stop() == 0
    log = service.log()
    assert "Traceback" not in log
    assert log.count("refused a malformed request from 127.0.0.1") == len(cases)
    assert await query(env, "SELECT count(*) FROM documents") == [(0,)]


async def test_a_request_head_that_trickles_in_is_cut_off(
    tmp_path: Path, service_env: dict[str, str]
) -> None:
    """Slowloris: a byte of the headers every tenth of a second would hold the
    connection for ever; past HEADER_TIMEOUT_SECONDS it is closed unanswered.
    An idle connection is closed too, and the service answers others meanwhile."""
    env = {**service_env, "HEADER_TIMEOUT_SECONDS": "1"}
    service = await ServiceProcess(["serve", "--no-worker"], env=env, cwd=tmp_path).started()
    head = b"POST /api HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + b"X: y\r\n" * 50
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", service.port)
        sent = 0
        with contextlib.suppress(ConnectionError):
            while not reader.at_eof() and sent < len(head):
                writer.write(head[sent : sent + 1])
                await writer.drain()
                sent += 1
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.1):
                        assert await reader.read() == b""  # closed, and nothing answered
        elapsed = loop.time() - started
        assert sent < len(head), "the whole head went through"
        assert 0.9 <= elapsed < 5
        async with asyncio.timeout(5):
            assert await idle_reader.read() == b""  # sent nothing at all: closed as well
        writer.close()
        idle_writer.close()
        line, _, _ = await exchange(
            service.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert line == "HTTP/1.1 200 OK"
    finally:
        assert service.stop() == 0
