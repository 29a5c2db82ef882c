"""read_capped against a real loopback server that sends a body in pieces, with pauses
between them (the case where one ``StreamReader.read(n)`` returns only the first piece)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from gwtest import LoopbackServer
from mtls_gateway.bodies import read_capped


class PieceServer(LoopbackServer):
    """GET /?n=N&size=S: N pieces of S bytes each, flushed separately (chunked encoding)."""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        pieces, size = int(request.query["n"]), int(request.query["size"])
        response = web.StreamResponse()
        await response.prepare(request)
        for i in range(pieces):
            await response.write(bytes([0x41 + i % 26]) * size)
            await asyncio.sleep(0.02)       # the client sees each piece arrive on its own
        await response.write_eof()
        return response


@pytest.fixture
async def pieces() -> AsyncIterator[str]:
    server = PieceServer()
    app = web.Application()
    app.router.add_get("/", server.handle)
    url = await server.serve(app)
    yield url
    await server.stop()


@pytest.mark.parametrize(("n", "size", "limit", "expected_len"), [
    (1, 100, 1000, 100),            # one piece
    (5, 300, 1500, 1500),           # five pieces: all of them, exactly at the cap
    (5, 300, 1499, 1500),           # one byte over the cap: limit + 1 bytes, then stop
    (40, 1000, 4096, 4097),         # far over the cap: never more than limit + 1 read
    (0, 0, 100, 0),                 # an empty body
])
async def test_reads_every_piece_up_to_the_cap(pieces: str, n: int, size: int, limit: int,
                                               expected_len: int) -> None:
    async with aiohttp.ClientSession() as session, \
            session.get(pieces, params={"n": n, "size": size}) as resp:
        body = await read_capped(resp.content, limit)
    assert len(body) == expected_len
    expected = b"".join(bytes([0x41 + i % 26]) * size for i in range(n))[:limit + 1]
    assert body == expected
