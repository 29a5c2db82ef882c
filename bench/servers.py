"""The benchmark's helper servers, one per process (started by ``bench/run.py``).

    python bench/servers.py upstream      [--tls CERT KEY CA]      # minimal upstream
    python bench/servers.py introspection --tls CERT KEY CA --tokens FILE --secret-file FILE
    python bench/servers.py plain-proxy   --tls CERT KEY CA --upstream URL

* ``upstream``: answers every request with a small fixed JSON body. Plain HTTP: a raw
  asyncio protocol (HTTP/1.1 keep-alive, no framework), so that one core of it answers far
  more than any proxy in front of it sends, and the rows measure the proxy, not the upstream
  (HAProxy included). With ``--tls``: aiohttp over mutual TLS, the "upstream alone over mTLS"
  reference row.
* ``introspection``: an RFC 7662 endpoint over HTTPS that checks the gateway's
  client_secret_basic credentials and answers the claims stored for the token (``active: true``
  with ``cnf``), or ``{"active": false}``.
* ``plain-proxy``: a plain aiohttp mutual-TLS reverse proxy with no auth at all (no token,
  no binding, no decision log, no metrics): what TLS + proxying alone costs in aiohttp.
* ``raw-proxy``: the least Python a mutual-TLS proxy can be (an asyncio protocol per
  connection, one upstream connection each, request heads passed on as they are, answers
  relayed by Content-Length; no checks, no log): the floor of what CPython's ``ssl`` and the
  event loop cost per request and per handshake, whatever runs on top of them.

Each binds 127.0.0.1 on a free port, prints ``LISTENING <port>`` once ready, and stops on
SIGTERM/SIGINT or by itself after ``--max-seconds``. All run on uvloop when it is installed,
like the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import signal
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

_BODY = b'{"ok":true,"upstream":"bench"}'
_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "trailers", "transfer-encoding", "upgrade", "host", "content-length",
})
_SESSION = web.AppKey("session", aiohttp.ClientSession)


def _server_context(cert: str, key: str, ca: str, *, mutual: bool = True) -> ssl.SSLContext:
    """Like the gateway's listener: client certificate required (``mutual``), no
    renegotiation. The introspection endpoint is plain server-side TLS (``mutual=False``)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(cafile=ca)
    ctx.verify_mode = ssl.CERT_REQUIRED if mutual else ssl.CERT_NONE
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    ctx.num_tickets = 1         # as the gateway's listener
    return ctx


# --- upstream ----------------------------------------------------------------------------------

async def _upstream(request: web.Request) -> web.Response:
    if request.body_exists:
        await request.read()
    return web.Response(body=_BODY, content_type="application/json")


def upstream_app() -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/{path:.*}", _upstream)
    return app


class RawUpstream(asyncio.Protocol):
    """The plain-HTTP upstream without a framework: every complete request head (and its
    Content-Length body, skipped) gets the fixed answer; keep-alive, pipelining tolerated."""

    _ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
               + str(len(_BODY)).encode() + b"\r\n\r\n" + _BODY)
    _BAD = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

    def __init__(self) -> None:
        self.buf = b""
        self.skip = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        buf = self.buf + data
        out = []
        while True:
            if self.skip:
                n = min(self.skip, len(buf))
                buf, self.skip = buf[n:], self.skip - n
                if self.skip:
                    break
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head, buf = buf[:end].lower(), buf[end + 4:]
            if b"transfer-encoding:" in head:
                self.transport.write(b"".join(out) + self._BAD)
                self.transport.close()
                return
            at = head.find(b"content-length:")
            if at >= 0:
                self.skip = int(head[at + 15:].split(b"\r\n", 1)[0])
            out.append(self._ANSWER)
        self.buf = buf
        if out:
            self.transport.write(b"".join(out))


# --- introspection endpoint ---------------------------------------------------------------------

def introspection_app(tokens: dict[str, dict[str, Any]], client_id: str,
                      secret: str) -> web.Application:
    app = web.Application()

    async def introspect(request: web.Request) -> web.Response:
        header = request.headers.get("Authorization", "")
        ok = False
        if header.startswith("Basic "):
            cid, _, sec = base64.b64decode(header[6:]).decode().partition(":")
            ok = unquote(cid) == client_id and unquote(sec) == secret
        if not ok:
            return web.json_response({"error": "invalid_client"}, status=401)
        form = await request.post()
        answer = tokens.get(str(form.get("token", "")), {"active": False})
        return web.json_response(answer)

    app.router.add_post("/introspect", introspect)
    return app


# --- plain reverse proxy ------------------------------------------------------------------------

def plain_proxy_app(upstream: str) -> web.Application:
    base = upstream.rstrip("/")
    app = web.Application()

    async def session_ctx(app: web.Application) -> Any:
        app[_SESSION] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=100),
            auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar())
        yield
        await app[_SESSION].close()

    async def proxy(request: web.Request) -> web.StreamResponse:
        headers = CIMultiDict((k, v) for k, v in request.headers.items()
                              if k.lower() not in _HOP_BY_HOP)
        async with request.app[_SESSION].request(
                request.method, base + request.raw_path, headers=headers,
                data=request.content if request.body_exists else None, allow_redirects=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type", "Accept"),
        ) as up:
            response = web.StreamResponse(status=up.status, reason=up.reason)
            response.headers.extend((k, v) for k, v in up.headers.items()
                                    if k.lower() not in _HOP_BY_HOP)
            await response.prepare(request)
            async for chunk in up.content.iter_chunked(64 * 1024):
                await response.write(chunk)
            await response.write_eof()
            return response

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{path:.*}", proxy)
    return app


class _RawUpstreamSide(asyncio.Protocol):
    def __init__(self, client: _RawProxy) -> None:
        self.client = client
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        while True:             # whole answers only (the bench upstream sends Content-Length)
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            at = buf.lower().find(b"content-length:", 0, end)
            size = end + 4 + (int(buf[at + 15:buf.index(b"\r\n", at)]) if at >= 0 else 0)
            if len(buf) < size:
                break
            self.client.answer(buf[:size])
            buf = buf[size:]
        self.buf = buf

    def connection_lost(self, exc: BaseException | None) -> None:
        self.client.close()


class _RawProxy(asyncio.Protocol):
    """See ``raw-proxy`` in the module docstring."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.transport: asyncio.Transport | None = None
        self.up: asyncio.Transport | None = None
        self.waiting: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        up, _ = await asyncio.get_running_loop().create_connection(
            lambda: _RawUpstreamSide(self), *self.upstream)
        self.up = up
        for data in self.waiting:
            up.write(data)

    def data_received(self, data: bytes) -> None:
        if self.up is None:
            self.waiting.append(data)
        else:
            self.up.write(data)

    def answer(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.up is not None:
            self.up.close()


async def serve_raw_proxy(ctx: ssl.SSLContext, upstream: str, max_seconds: float) -> None:
    host, _, port = upstream.split("://", 1)[1].rstrip("/").rpartition(":")
    await serve_protocol(lambda: _RawProxy((host, int(port))), ctx, max_seconds)


# --- process ------------------------------------------------------------------------------------

async def serve_protocol(factory: Any, ctx: ssl.SSLContext | None, max_seconds: float) -> None:
    """A bare asyncio server of ``factory`` protocols until SIGTERM/SIGINT or ``max_seconds``."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(factory, "127.0.0.1", 0, ssl=ctx, backlog=1024)
    print(f"LISTENING {server.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), max_seconds)
    server.close()


def run(main: Any) -> None:
    """On uvloop when installed (as the gateway runs), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


async def serve(app: web.Application, ctx: ssl.SSLContext | None, max_seconds: float) -> None:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx).start()
    print(f"LISTENING {runner.addresses[0][1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), max_seconds)  # stops by itself in any case
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("role", choices=("upstream", "introspection", "plain-proxy",
                                         "raw-proxy"))
    parser.add_argument("--tls", nargs=3, metavar=("CERT", "KEY", "CA"),
                        help="serve mutual TLS with this certificate, key and client CA")
    parser.add_argument("--tokens", type=Path, help="introspection: JSON {token: answer}")
    parser.add_argument("--client-id", default="mtls-gateway")
    parser.add_argument("--secret-file", type=Path, help="introspection: the client secret")
    parser.add_argument("--upstream", help="plain-proxy: upstream base URL")
    parser.add_argument("--max-seconds", type=float, default=900.0,
                        help="stop by itself after this long (default 900)")
    args = parser.parse_args()
    ctx = (_server_context(*args.tls, mutual=args.role != "introspection")
           if args.tls else None)
    app: web.Application
    if args.role == "upstream" and ctx is None:
        run(serve_protocol(RawUpstream, None, args.max_seconds))
        return
    if args.role == "raw-proxy":
        if ctx is None or not args.upstream:
            parser.error("raw-proxy needs --tls and --upstream")
        run(serve_raw_proxy(ctx, args.upstream, args.max_seconds))
        return
    if args.role == "upstream":
        app = upstream_app()
    elif args.role == "introspection":
        if ctx is None or args.tokens is None or args.secret_file is None:
            parser.error("introspection needs --tls, --tokens and --secret-file")
        tokens = json.loads(args.tokens.read_text())
        app = introspection_app(tokens, args.client_id, args.secret_file.read_text().strip())
    else:
        if ctx is None or not args.upstream:
            parser.error("plain-proxy needs --tls and --upstream")
        app = plain_proxy_app(args.upstream)
    run(serve(app, ctx, args.max_seconds))


if __name__ == "__main__":
    main()
