"""edge_tier.http: what every HTTP service shares, on a real socket: a malformed request is one
warning line (no traceback), a handler's failure stays an error with its traceback, and aiohttp's
own 405 keeps its ``Allow`` header when it becomes problem+json."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from aiohttp import web

from edge_tier.http import OpsServer, app_runner, problem_from, serve_tcp


async def _raw(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(65536), 5)
    writer.close()
    return answer


async def _serve_and_ask(app: web.Application, request: bytes) -> bytes:
    """``app`` on a loopback port behind ``app_runner`` (as every service runs), one raw request."""
    runner = app_runner(app)
    await runner.setup()
    try:
        port = await serve_tcp(runner, "127.0.0.1", 0)
        assert port is not None
        return await _raw(port, request)
    finally:
        await runner.cleanup()


async def _ready() -> dict[str, bool]:
    return {"ok": True}


def _server_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "aiohttp.server"]


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad\x01Name: v\r\n\r\n",  # a control character in a name
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
        b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n",
    ],
)
def test_a_malformed_request_is_one_warning_line(
    caplog: pytest.LogCaptureFixture, request_bytes: bytes
) -> None:
    async def go() -> bytes:
        ops = OpsServer(_ready)
        await ops.start("127.0.0.1", 0)
        try:
            assert ops.port is not None
            return await _raw(ops.port, request_bytes)
        finally:
            await ops.stop()

    with caplog.at_level(logging.DEBUG, logger="aiohttp.server"):
        answer = asyncio.run(go())
    assert answer.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400"))
    [record] = _server_records(caplog)
    assert record.levelno == logging.WARNING, record.getMessage()
    assert record.exc_info is None and record.exc_text is None
    text = record.getMessage()
    assert "\n" not in text and "127.0.0.1" in text and "malformed HTTP, answered 400" in text


def test_a_failing_handler_stays_an_error_with_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError("a bug")

    async def go() -> bytes:
        app = web.Application()
        app.add_routes([web.get("/boom", boom)])
        return await _serve_and_ask(app, b"GET /boom HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")

    with caplog.at_level(logging.DEBUG, logger="aiohttp.server"):
        answer = asyncio.run(go())
    assert answer.startswith(b"HTTP/1.1 500")
    [record] = _server_records(caplog)
    assert record.levelno == logging.ERROR and record.exc_info is not None
    assert isinstance(record.exc_info[1], RuntimeError)


def test_a_405_as_problem_json_keeps_allow() -> None:
    @web.middleware
    async def as_problem(request: web.Request, handler: web.RequestHandler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as e:
            return problem_from(e, request)

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({})

    async def go() -> bytes:
        app = web.Application(middlewares=[as_problem])
        app.add_routes([web.get("/thing", ok)])
        return await _serve_and_ask(app, b"DELETE /thing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")

    head, _, body = asyncio.run(go()).partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:])}
    assert lines[0].startswith("HTTP/1.1 405")
    assert headers["content-type"].startswith("application/problem+json")
    assert {m.strip() for m in headers["allow"].split(",")} == {"GET", "HEAD"}
    problem = json.loads(body)
    assert (
        problem["status"] == 405
        and problem["detail"] == "DELETE is not allowed on /thing; allowed: GET, HEAD"
    )
