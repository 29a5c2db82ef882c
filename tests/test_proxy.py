"""Forwarding answers unchanged, whatever their framing: headers sent with the first body
bytes for small Content-Length answers (one write), streamed as before otherwise."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from gwtest import GatewayFactory, LoopbackServer, Pki, Upstream, base_config


class Shapes(LoopbackServer):
    """An upstream answering /<shape> in several framings."""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        shape = request.match_info["shape"]
        if shape == "small":
            return web.Response(body=b"x" * 100, headers={"X-Shape": "small"})
        if shape == "empty":
            return web.Response(body=b"", headers={"X-Shape": "empty"})
        if shape == "nocontent":
            return web.Response(status=204, headers={"X-Shape": "nocontent"})
        if shape == "notmodified":
            return web.Response(status=304, headers={"ETag": '"v1"'})
        if shape == "exact-chunk":
            return web.Response(body=b"y" * 65536)
        if shape == "over-chunk":
            return web.Response(body=b"z" * 65537)
        resp = web.StreamResponse(headers={"X-Shape": "chunked"})   # no Content-Length
        await resp.prepare(request)
        for _ in range(3):
            await resp.write(b"c" * 1000)
        await resp.write_eof()
        return resp

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/public/{shape}", self.handle)
        return await self.serve(app)


@pytest.fixture
async def shapes() -> AsyncIterator[Shapes]:
    server = Shapes()
    yield server
    await server.stop()


@pytest.mark.parametrize(("shape", "status", "body", "length"), [
    ("small", 200, b"x" * 100, "100"),
    ("empty", 200, b"", "0"),
    ("nocontent", 204, b"", None),
    ("notmodified", 304, b"", None),
    ("exact-chunk", 200, b"y" * 65536, "65536"),
    ("over-chunk", 200, b"z" * 65537, "65537"),
    ("chunked", 200, b"c" * 3000, None),
])
async def test_every_framing_arrives_unchanged(
        make_gateway: GatewayFactory, pki: Pki, upstream: Upstream, shapes: Shapes,
        shape: str, status: int, body: bytes, length: str | None) -> None:
    config = base_config(pki, None, upstream)
    config["upstream"]["url"] = await shapes.start()
    config["routes"] = [{"name": "public", "path_prefix": "/public", "auth": "none"}]
    gw = await make_gateway(config)
    for _ in range(2):     # the second on a reused upstream connection
        reply = await gw.request(f"/public/{shape}")
        assert (reply.status, reply.body) == (status, body)
        assert reply.headers.get("Content-Length") == length
        if shape == "notmodified":
            assert reply.headers["ETag"] == '"v1"'
        elif shape != "over-chunk" and shape != "exact-chunk":
            assert reply.headers["X-Shape"] == shape
