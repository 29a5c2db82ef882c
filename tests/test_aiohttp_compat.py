"""aiohttp's unpromised parts the gateway relies on (aiohttp_compat.py) are still there.

Run against live objects of the installed aiohttp: an upgrade that renames or drops one
fails here, naming it, before anything subtler breaks in connection.py or proxy.py.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from mtls_gateway import aiohttp_compat
from mtls_gateway.aiohttp_compat import (
    REQUEST_HANDLER_INTERNALS,
    RUNNER_INTERNALS,
    SERVER_INTERNALS,
    RequestHandler,
    fail_body_on_connection_loss,
)


@pytest.fixture
async def served() -> AsyncIterator[dict[str, object]]:
    """A real aiohttp server on loopback; its handler reports what it saw of its request
    and connection protocol."""
    seen: dict[str, object] = {}

    async def handle(request: web.Request) -> web.Response:
        protocol = request.protocol
        seen["protocol"] = protocol
        seen["missing"] = [n for n in REQUEST_HANDLER_INTERNALS if not hasattr(protocol, n)]
        seen["started_before"] = aiohttp_compat.response_started(request)
        aiohttp_compat.answer_in_http11(request)
        seen["version"] = request.version
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    seen["runner"] = runner
    seen["port"] = runner.addresses[0][1]
    try:
        yield seen
    finally:
        await runner.cleanup()


async def test_request_handler_and_request_internals(served: dict[str, object]) -> None:
    async with aiohttp.ClientSession() as session, \
            session.get(f"http://127.0.0.1:{served['port']}/") as resp:
        assert resp.status == 200
    assert isinstance(served["protocol"], RequestHandler)
    assert served["missing"] == [], f"RequestHandler lost {served['missing']}"
    assert served["started_before"] is False
    assert served["version"] == aiohttp.HttpVersion11
    assert inspect.isfunction(RequestHandler._process_keepalive)


async def test_server_and_runner_internals(served: dict[str, object]) -> None:
    runner = served["runner"]
    assert isinstance(runner, web.AppRunner)
    server = runner.server
    assert isinstance(server, web.Server)
    assert [n for n in SERVER_INTERNALS if not hasattr(server, n)] == []
    assert [n for n in RUNNER_INTERNALS
            if not inspect.iscoroutinefunction(getattr(web.AppRunner, n, None))] == []


async def test_a_body_read_fails_when_the_framing_breaks_in_a_later_read() -> None:
    """The head, a good chunk, then a broken chunk size in a later read: with the
    workaround the body read ends in ClientPayloadError instead of waiting forever."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(b"zz\r\n")
        await writer.drain()
        await asyncio.sleep(5)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession() as session, \
                session.get(f"http://127.0.0.1:{port}/") as resp:
            undo = fail_body_on_connection_loss(resp)
            chunks = []
            with pytest.raises(aiohttp.ClientPayloadError):
                async with asyncio.timeout(3):      # (a hang is the failure)
                    async for chunk in resp.content.iter_chunked(1024):
                        chunks.append(chunk)
            undo()
        assert chunks == [b"ok"]
    finally:
        server.close()
        await server.wait_closed()
