"""The fast lane: which requests take it, and that they get what the aiohttp path gives.

Real TLS connections to a real gateway; upstreams are real sockets on loopback that record
the bytes they receive and answer with scripted bytes.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gwtest import (
    Issuer,
    Pki,
    RawServer,
    RawUpstream,
    RunningGateway,
    Upstream,
    base_config,
    raw_exchange,
)
from mtls_gateway.fastlane import parse_plain


def plain(head: bytes) -> bool:
    return parse_plain(head, max_headers=100, max_line=16384) is not None


OK = b"GET /x?a=1 HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer abc\r\nAccept: */*"


@pytest.mark.parametrize(("head", "expected"), [
    (OK, True),
    (b"HEAD / HTTP/1.1\r\nHost: h", True),
    (b"DELETE /r/1 HTTP/1.1\r\nHost: h\r\nConnection: close", True),
    (b"OPTIONS /x HTTP/1.1\r\nhost:h", True),
    (b"POST /x HTTP/1.1\r\nHost: h", False),                        # methods with bodies
    (b"get /x HTTP/1.1\r\nHost: h", False),
    (b"GET /x HTTP/1.0\r\nHost: h", False),
    (b"GET http://other/x HTTP/1.1\r\nHost: h", False),             # absolute form
    (b"GET * HTTP/1.1\r\nHost: h", False),
    (b"GET /a%2fb HTTP/1.1\r\nHost: h", False),                     # anything to decode
    (b"GET /x?access_token=t HTTP/1.1\r\nHost: h", False),
    (b"GET /x#f HTTP/1.1\r\nHost: h", False),
    (b"GET /x  HTTP/1.1\r\nHost: h", False),
    (b"GET /x HTTP/1.1", False),                                    # no Host
    (b"GET /x HTTP/1.1\r\nHost: h\r\nHost: i", False),
    (b"GET /x HTTP/1.1\r\nHost:", False),
    (OK + b"\r\nAuthorization: Bearer def", False),
    (OK + b"\r\nContent-Length: 0", False),
    (OK + b"\r\nTransfer-Encoding: chunked", False),
    (OK + b"\r\nExpect: 100-continue", False),
    (OK + b"\r\nUpgrade: websocket\r\nConnection: upgrade", False),
    (OK + b"\r\nConnection: Upgrade", False),
    (OK + b"\r\nX-A: 1\n", False),                                  # bare LF
    (OK + b"\r\nX-A: 1\rX", False),                                 # bare CR
    (OK + b"\r\n folded", False),                                   # obs-fold
    (OK + b"\r\nX A: 1", False),
    (OK + b"\r\nX-A : 1", False),
    (OK + b"\r\nX-A: caf\xc3\xa9", False),                          # not ASCII
    (OK + b"\r\nX-A: \x00", False),
    (OK + b"\r\nX-A: " + b"a" * 20000, False),                      # over max_line
    (OK + b"\r\nAccept", False),                       # a known name, but no colon
    (b"GET /x HTTP/1.1\r\nHost", False),
    (OK + b"\r\nX-Forwarded-For: 1.2.3.4", True),      # stripped (exact name): plain
    (OK + b"\r\nX-Forwarded-Evil: 1", False),          # a stripped family not in the set
    (OK + b"\r\nX_A: 1", False),
    (OK + b"\r\nDPoP: a\r\nDPoP: b", True),            # (the pipeline refuses two proofs)
])
def test_what_is_plain(head: bytes, expected: bool) -> None:
    """Twice: header names and Host values are classified once and remembered, and a
    remembered verdict must be the same as the first."""
    assert plain(head) is expected
    assert plain(head) is expected


def test_plain_request_fields() -> None:
    req = parse_plain(OK + b"\r\nConnection: keep-alive, X-Hop", max_headers=100,
                      max_line=16384)
    assert req is not None
    assert (req.method, req.path, req.raw_path, req.host, req.authorization) == (
        "GET", "/x", "/x?a=1", "h", ("Bearer abc",))
    assert req.connection == {b"keep-alive", b"x-hop"}


def test_too_many_headers_is_not_plain() -> None:
    head = b"GET / HTTP/1.1\r\nHost: h" + b"\r\nX: 1" * 5
    assert parse_plain(head, max_headers=6, max_line=100) is not None
    assert parse_plain(head, max_headers=5, max_line=100) is None


# --- through a real gateway --------------------------------------------------------------------


async def _gateway(make_gateway: Any, pki: Pki, issuer: Issuer, url: str, *,
                   fast_lane: bool = True, **upstream: Any) -> RunningGateway:
    config = base_config(pki, issuer, Upstream())
    config["upstream"].update(url=url, **upstream)
    config["fast_lane"] = fast_lane
    gw: RunningGateway = await make_gateway(config)
    return gw


def _lane_connections(gw: RunningGateway) -> int:
    lane = gw.server.gateway.lane
    return lane.pool.opened if lane is not None else 0


def _header_lines(raw: bytes) -> list[bytes]:
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    return [head[0], *sorted(line.lower() for line in head[1:])]


async def _exchange(gw: RunningGateway, head: str, cert: str = "a") -> bytes:
    return await raw_exchange(gw, head.replace("\n", "\r\n").encode(), cert=cert)


REQUEST = ("GET /orders/7?x=1 HTTP/1.1\nHost: api.example\nAuthorization: Bearer {token}\n"
           "X-Forwarded-For: 6.6.6.6\nX-Client-Cert-Thumbprint: forged\nConnection: close, X-Hop\n"
           "X-Hop: 1\nTE: trailers\nAccept: application/json\n\n")


@pytest.mark.parametrize("cert", ["a", "b"])        # b: the token is bound to a
async def test_same_answer_and_same_upstream_request_in_and_out_of_the_lane(
        make_gateway: Any, pki: Pki, issuer: Issuer, raw_upstream: RawUpstream,
        cert: str) -> None:
    token = issuer.mint(pki.clients["a"].thumbprint)
    answers, heads = [], []
    for fast in (True, False):
        gw = await _gateway(make_gateway, pki, issuer, raw_upstream.url, fast_lane=fast)
        before = len(raw_upstream.requests)
        raw = await _exchange(gw, REQUEST.format(token=token), cert)
        assert (_lane_connections(gw) > 0) is (fast and cert == "a")
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = [line for line in head.split(b"\r\n") if not line.startswith(b"Date:")]
        answers.append((lines[0], sorted(lines[1:]), body))
        heads.append([_header_lines(r) for r in raw_upstream.requests[before:]])
    assert answers[0] == answers[1]
    assert heads[0] == heads[1]
    if cert == "a":
        (sent,) = heads[0]
        assert b"x-forwarded-for: 127.0.0.1" in sent and b"x-hop: 1" not in sent
        assert not any(line.startswith((b"te:", b"connection:")) for line in sent)
        assert b"x-client-cert-thumbprint: " + pki.clients["a"].thumbprint.lower().encode() \
            in sent
    else:
        assert heads[0] == []                         # the upstream saw nothing
        assert answers[0][0] == b"HTTP/1.1 401 Unauthorized"
        assert json.loads(answers[0][2])["reason"] == "binding_mismatch"


@pytest.mark.parametrize(("head", "lane"), [
    ("GET /x HTTP/1.1\nHost: h\nAuthorization: Bearer {token}\nConnection: close\n\n", True),
    ("POST /x HTTP/1.1\nHost: h\nAuthorization: Bearer {token}\nContent-Length: 2\n"
     "Connection: close\n\nhi", False),
    ("GET /x HTTP/1.0\nHost: h\nAuthorization: Bearer {token}\n\n", False),
    ("GET /%78 HTTP/1.1\nHost: h\nAuthorization: Bearer {token}\nConnection: close\n\n", False),
])
async def test_only_plain_requests_take_the_lane(make_gateway: Any, pki: Pki, issuer: Issuer,
                                                 raw_upstream: RawUpstream, head: str,
                                                 lane: bool) -> None:
    gw = await _gateway(make_gateway, pki, issuer, raw_upstream.url)
    raw = await _exchange(gw, head.format(token=issuer.mint(pki.clients["a"].thumbprint)))
    assert raw.split(b"\r\n", 1)[0].split(b" ")[1] == b"200"
    assert (_lane_connections(gw) > 0) is lane
    assert len(raw_upstream.requests) == 1


async def test_keep_alive_mixes_lane_and_aiohttp_in_order(
        make_gateway: Any, pki: Pki, issuer: Issuer, raw_upstream: RawUpstream) -> None:
    """Plain requests, then a POST (the connection leaves the lane), then plain again: every
    answer arrives, in order, on the one connection."""
    gw = await _gateway(make_gateway, pki, issuer, raw_upstream.url)
    token = issuer.mint(pki.clients["a"].thumbprint)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", gw.server.port, ssl=pki.client_context("a"), server_hostname="localhost")
    get = f"GET /g HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    post = (f"POST /p HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer {token}\r\n"
            "Content-Length: 3\r\n\r\nabc").encode()
    try:
        for data in (get, get, post, get):
            writer.write(data)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200 ")
            assert await reader.readexactly(2) == b"ok"
    finally:
        writer.close()
    assert [r.split(b" ", 2)[:2] for r in raw_upstream.requests] == [
        [b"GET", b"/g"], [b"GET", b"/g"], [b"POST", b"/p"], [b"GET", b"/g"]]
    assert _lane_connections(gw) == 1           # two lane requests on one pooled connection


class ScriptedUpstream(RawServer):
    """Reads one request head per answer and writes the next scripted answer as is;
    ``None`` in the script closes the connection instead."""

    def __init__(self, answers: list[bytes | None]) -> None:
        super().__init__()
        self.answers = answers
        self.requests: list[bytes] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while self.answers:
            self.requests.append(await reader.readuntil(b"\r\n\r\n"))
            answer = self.answers.pop(0)
            if answer is None:
                break
            writer.write(answer)
            await writer.drain()
            if b"connection: close" in answer.lower() or (
                    b"content-length" not in answer.lower()
                    and b"chunked" not in answer.lower() and b" 204 " not in answer
                    and not self.requests[-1].startswith(b"HEAD")):
                break


@pytest.fixture
async def scripted() -> AsyncIterator[ScriptedUpstream]:
    up = ScriptedUpstream([])
    await up.start()
    yield up
    await up.stop()


_H = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"


@pytest.mark.parametrize(("method", "answers", "status", "body"), [
    ("GET", [_H + b"Content-Length: 5\r\n\r\nhello"], 200, b"hello"),
    ("GET", [_H + b"Transfer-Encoding: chunked\r\n\r\n2;ext=1\r\nhe\r\n3\r\nllo\r\n0\r\n"
             b"X-Trailer: t\r\n\r\n"], 200, b"hello"),
    ("GET", [_H + b"Connection: close\r\n\r\nhello until close"], 200, b"hello until close"),
    ("GET", [b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + _H
             + b"Content-Length: 2\r\n\r\nok"], 200, b"ok"),
    ("HEAD", [_H + b"Content-Length: 5\r\n\r\n"], 200, b""),
    ("GET", [b"HTTP/1.1 204 No Content\r\n\r\n"], 204, b""),
    ("OPTIONS", [b"HTTP/1.1 200 OK\r\nAllow: GET\r\nContent-Length: 0\r\n\r\n"], 200, b""),
    ("GET", [b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\nok"], 502, None),
    ("GET", [_H + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"], 502, None),
    ("GET", [_H + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\nok"], 502, None),
    ("GET", [_H + b"Content-Length: " + b"9" * 5000 + b"\r\n\r\nok"], 502, None),
    ("GET", [_H + b"Transfer-Encoding: gzip\r\n\r\n"], 502, None),
    ("GET", [_H + b"X-Bad: a\nb\r\nContent-Length: 2\r\n\r\nok"], 502, None),
    ("GET", [b"HTTP/1.1 101 Switching Protocols\r\n\r\n"], 502, None),
    ("GET", [None, _H + b"Content-Length: 2\r\n\r\nok"], 200, b"ok"),   # retried once
    ("GET", [None, None], 502, None),                                    # not twice
])
async def test_upstream_answers_relayed_or_refused(
        make_gateway: Any, pki: Pki, issuer: Issuer, scripted: ScriptedUpstream, method: str,
        answers: list[bytes | None], status: int, body: bytes | None) -> None:
    scripted.answers = list(answers)
    gw = await _gateway(make_gateway, pki, issuer, scripted.url)
    reply = await gw.request("/x", method=method,
                             token=issuer.mint(pki.clients["a"].thumbprint))
    assert reply.status == status
    if body is not None:
        assert reply.body == body
        assert "X-Trailer" not in reply.headers           # trailers dropped, as aiohttp does
    else:
        assert reply.json()["reason"] == "upstream_unavailable"
    assert _lane_connections(gw) >= 1
    assert len(scripted.requests) == len(answers) - len(scripted.answers)


async def test_upstream_timeout_and_down_in_the_lane(make_gateway: Any, pki: Pki,
                                                     issuer: Issuer,
                                                     raw_upstream: RawUpstream) -> None:
    raw_upstream.mode = "hang"
    gw = await _gateway(make_gateway, pki, issuer, raw_upstream.url, read_timeout="200ms")
    token = issuer.mint(pki.clients["a"].thumbprint)
    reply = await gw.request("/x", token=token)
    assert (reply.status, reply.json()["reason"]) == (504, "upstream_timeout")
    assert _lane_connections(gw) == 1
    await raw_upstream.stop()
    reply = await gw.request("/x", token=token)
    assert (reply.status, reply.json()["reason"]) == (502, "upstream_unavailable")


async def test_large_answer_streams_through_the_lane(make_gateway: Any, pki: Pki,
                                                     issuer: Issuer, upstream: Upstream) -> None:
    """A 24 MiB answer with the upstream's Connection-named headers: relayed whole, never
    with the hop-by-hop ones."""
    gw = await _gateway(make_gateway, pki, issuer, upstream.url)
    reply = await gw.request(f"/big?n={24 << 20}",
                             token=issuer.mint(pki.clients["a"].thumbprint))
    assert reply.status == 200 and len(reply.body) == 24 << 20
    assert "X-Secret-Hop" not in reply.headers and "Keep-Alive" not in reply.headers
    assert _lane_connections(gw) == 1


async def test_max_requests_per_connection_in_the_lane(
        make_gateway: Any, pki: Pki, issuer: Issuer, raw_upstream: RawUpstream) -> None:
    config = base_config(pki, issuer, Upstream())
    config["upstream"]["url"] = raw_upstream.url
    config["limits"] = {"max_requests_per_connection": 2}
    gw = await make_gateway(config)
    token = issuer.mint(pki.clients["a"].thumbprint)
    get = f"GET /x HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer {token}\r\n\r\n"
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", gw.server.port, ssl=pki.client_context("a"), server_hostname="localhost")
    try:
        heads = []
        for _ in range(2):
            writer.write(get.encode())
            heads.append(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10))
            await reader.readexactly(2)
        assert await asyncio.wait_for(reader.read(), 10) == b""     # then closed
    finally:
        writer.close()
    assert b"Connection: close" not in heads[0] and b"Connection: close" in heads[1]
    assert _lane_connections(gw) == 1


async def test_read_timeout_holds_for_each_request_on_a_kept_alive_connection(
        make_gateway: Any, pki: Pki, issuer: Issuer, raw_upstream: RawUpstream) -> None:
    """The lane keeps one timer per connection across requests: a later request that hangs
    still gets its 504, and a quick one before it is not cut short."""
    gw = await _gateway(make_gateway, pki, issuer, raw_upstream.url, read_timeout="300ms")
    token = issuer.mint(pki.clients["a"].thumbprint)
    get = f"GET /x HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", gw.server.port, ssl=pki.client_context("a"), server_hostname="localhost")
    try:
        for mode, status in (("ok", b"200"), ("ok", b"200"), ("hang", b"504")):
            raw_upstream.mode = mode
            writer.write(get)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.split(b" ")[1] == status
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            body = await reader.readexactly(length)
            if status == b"504":
                assert json.loads(body)["reason"] == "upstream_timeout"
            await asyncio.sleep(0.2)        # the pending timer outlives the quick requests
    finally:
        writer.close()
    assert _lane_connections(gw) >= 1


@pytest.mark.parametrize("fast", [True, False])
async def test_upstream_reset_mid_answer_is_counted_the_same_in_and_out_of_the_lane(
        make_gateway: Any, pki: Pki, issuer: Issuer, raw_upstream: RawUpstream,
        fast: bool) -> None:
    raw_upstream.mode = "reset_mid_response"
    gw = await _gateway(make_gateway, pki, issuer, raw_upstream.url, fast_lane=fast)
    token = issuer.mint(pki.clients["a"].thumbprint)
    raw = await _exchange(gw, f"GET /x HTTP/1.1\nHost: h\nAuthorization: Bearer {token}\n\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and len(body) < 1048576
    assert (_lane_connections(gw) == 1) is fast
    metrics = gw.server.metrics.render().decode()
    assert 'mtls_gateway_upstream_errors_total{reason="upstream_aborted",route="api"} 1.0' \
        in metrics
    assert re.search(r'mtls_gateway_requests_total\{decision="allow",reason="upstream_aborted",'
                     r'route="api",status="200"\} 1\.0', metrics)


async def test_aiohttp_request_task_only_once_aiohttp_gets_bytes(
        make_gateway: Any, pki: Pki, issuer: Issuer, upstream: Upstream) -> None:
    """A connection served by the lane alone has no aiohttp request task (one per
    connection saved); its first request that is not plain starts it, and aiohttp answers
    on the same connection."""
    config = base_config(pki, issuer, upstream)
    gw: RunningGateway = await make_gateway(config)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", gw.server.port, ssl=pki.client_context("a"), server_hostname="localhost")
    try:
        runner = gw.server._runner
        assert runner is not None and runner.server is not None

        async def ask(request: bytes) -> bytes:
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:")))
            await asyncio.wait_for(reader.readexactly(length), 30)
            return head

        assert (await ask(b"GET /public/1 HTTP/1.1\r\nHost: gw\r\n\r\n")).startswith(
            b"HTTP/1.1 200")
        (handler,) = runner.server.connections
        assert handler._task_handler is None
        assert (await ask(b"POST /public/2 HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n\r\nhi")
                ).startswith(b"HTTP/1.1 200")
        assert handler._task_handler is not None
        assert [s.path_qs for s in upstream.seen] == ["/public/1", "/public/2"]
    finally:
        writer.close()
